"""The cloud aggregator service (issue: federated system over MQTT).

It will be a thin service over :mod:`devft_edge`: plan each stage, pack and ship the fused submodel,
and merge LoRA updates with the rules of :mod:`devft_edge.aggregation`. Today the same loop runs
in-process in :mod:`devft_edge.simulator`.
"""
