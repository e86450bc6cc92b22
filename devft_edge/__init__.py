"""devft-edge: Developmental Federated Tuning (DevFT) of LLM LoRA for edge devices.

The core package holds the algorithms, formats and protocol shared by the cloud aggregator and the
device agent. See ``docs/architecture.md`` for the module map.
"""

__version__ = "0.1.0"
