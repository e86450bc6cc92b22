"""The on-device training agent (issue: federated system over MQTT).

It will receive packs, train LoRA with :func:`devft_edge.training.train_local` (the simulator's
code path) on local data and return updates. Kept free of heavy dependencies beyond torch/peft.
"""
