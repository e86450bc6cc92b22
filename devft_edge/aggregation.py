"""Aggregation rules: how client LoRA updates become the next global state.

DevFT is the outer (stage) schedule; inside a stage any of these rules runs the rounds, so
``devft+fedsa`` is DevFT's schedule with FedSA-LoRA's rounds. A rule has a client half (what a
client starts from, what it sends, what it keeps) and a server half (streaming aggregation). All
states are canonical LoRA states (:mod:`devft_edge.lora`) in the current stage's layer space.

Aggregation consumes an *iterable* of updates and keeps one running weighted sum, so the server's
memory does not grow with the number of clients in a round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from devft_edge.errors import ConfigError
from devft_edge.lora import LoraState, init_lora_state, select, split_layers, state_bytes
from devft_edge.registry import Registry

logger = logging.getLogger(__name__)

RULES: Registry[AggregationRule] = Registry("aggregation rule")
StateMap = Callable[[LoraState], LoraState]
"""Maps a state between spaces: full model -> current stage (fusion) or back (transfer)."""


@dataclass
class GlobalState:
    """The server's model state inside a stage.

    ``lora`` is the shared LoRA clients start from. ``delta`` holds dense weight updates already
    merged into the base (FLoRA), keyed ``layers.{i}.{module}.delta`` with shape [out, in], *before*
    the LoRA scaling alpha/r (applied when merging into weights); it is empty for the other rules.
    Both transfer and fuse like LoRA.
    """

    lora: LoraState
    delta: LoraState = field(default_factory=dict)


@dataclass
class ClientMemory:
    """What a client keeps between rounds (on the device in a deployment)."""

    num_samples: int
    """Size of the client's local training set: its aggregation weight."""
    private: LoraState = field(default_factory=dict)
    """Factors the client never shares (FedSA-LoRA's B), in full-model space so they survive
    regrouping between stages."""
    synced_round: int = -1
    """FLoRA: the last round whose global update the client has merged."""


class RunningWeightedSum:
    """sum_k w_k x_k and sum_k w_k over a stream of states; O(one state) memory.

    The sum is kept in the updates' own precision, at least float32: LoRA updates (float32) are
    added in place without a float64 copy of every update, which made the merge 5x slower than an
    axpy over the same bytes (``docs/system_benchmarks.md``); FLoRA's float64 products stay
    float64, so its stacking identity stays exact. Relative rounding of a float32 sum of n
    updates is ~1e-7 * n at worst, far below the noise of one local round.
    """

    def __init__(self) -> None:
        self.total: dict[str, Tensor] = {}
        self.weight = 0.0

    def add(self, state: Mapping[str, Tensor], weight: float) -> None:
        """Add ``weight * state``; every state must have the keys and shapes of the first."""
        if weight <= 0:
            raise ConfigError(f"aggregation weight must be > 0, got {weight}")
        if self.total and state.keys() != self.total.keys():
            raise ConfigError("update keys differ from the first update of the round")
        if not self.total:
            self.total = {k: t.to(torch.promote_types(t.dtype, torch.float32)) * weight for k, t in state.items()}
            self.weight = weight
            return
        totals, tensors = [self.total[k] for k in state], list(state.values())
        for key, total, tensor in zip(state, totals, tensors, strict=True):
            if tensor.shape != total.shape:
                raise ConfigError(f"{key}: shape {tuple(tensor.shape)} != {tuple(total.shape)}")
        if all(t.dtype == a.dtype for t, a in zip(tensors, totals, strict=True)):
            # one multi-tensor kernel launch for the ~400 LoRA tensors (the optimizers' fast path)
            torch._foreach_add_(totals, tensors, alpha=weight)
        else:
            for total, tensor in zip(totals, tensors, strict=True):
                total.add_(tensor, alpha=weight)
        self.weight += weight

    def mean(self) -> LoraState:
        """The weighted mean, in fp32."""
        if self.weight == 0:
            raise ConfigError("no update to aggregate")
        return {k: (v / self.weight).to(torch.float32) for k, v in self.total.items()}


class AggregationRule:
    """Base class: FedIT behaviour (share A and B, average both)."""

    name = "fedit"
    paper = "Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning (FedIT), ICASSP 2024"
    shared: tuple[str, ...] = ("lora_A", "lora_B")
    """The factors clients send and the server aggregates; the others stay on the client."""
    merges_into_base = False
    """Whether clients merge a dense global update into their base weights (FLoRA): over the
    network it travels beside the pack, and a quantized pack holds it in fp32 (the planner counts it)."""

    def downlink(self, server: GlobalState, memory: ClientMemory, round_index: int) -> LoraState:
        """What the server sends a selected client this round."""
        return {k: v for k, v in server.lora.items() if k.endswith(self.shared)}

    def client_start(
        self, received: LoraState, server: GlobalState, memory: ClientMemory, to_stage: StateMap
    ) -> LoraState:
        """The LoRA the client trains from."""
        return dict(received)

    def uplink(self, trained: LoraState, memory: ClientMemory, to_full: StateMap) -> LoraState:
        """What the client sends back; keeps its private part in ``memory``."""
        return {k: v for k, v in trained.items() if k.endswith(self.shared)}

    def start_stage(self, first_round: int) -> None:
        """Called when a stage begins (its pack carries everything merged so far)."""

    def extra_downlink_bytes(self, server: GlobalState, memory: ClientMemory, round_index: int) -> int:
        """Bytes sent besides :meth:`downlink`'s state (FLoRA's merged updates)."""
        return 0

    def aggregate(
        self, server: GlobalState, updates: Iterable[tuple[LoraState, float]], round_index: int, seed: int
    ) -> GlobalState:
        """Sample-weighted mean of the shared factors; the rest of the server state is kept."""
        total = RunningWeightedSum()
        for state, weight in updates:
            total.add(state, weight)
        return GlobalState(lora={**server.lora, **total.mean()}, delta=server.delta)

    def eval_lora(self, server: GlobalState, memories: Iterable[ClientMemory], to_stage: StateMap) -> LoraState:
        """The single LoRA that represents the federation for evaluation and export."""
        return server.lora

    def final_upload(self, memory: ClientMemory) -> LoraState:
        """What a client uploads once at the end of the run for export (nothing by default)."""
        return {}


RULES.register("fedit")(AggregationRule)


@RULES.register("fedsa")
class FedSALoRA(AggregationRule):
    """FedSA-LoRA: only A is shared and averaged; each client keeps its own B across rounds.

    The federation's single model (for evaluation and export) pairs the global A with the
    sample-weighted mean of the clients' private B; in a deployment each client uploads its B once
    at the end of the run for that (counted in the uplink bytes).
    """

    name = "fedsa"
    paper = "Guo et al., Selective Aggregation for Low-Rank Adaptation in Federated Learning, ICLR 2025"
    shared = ("lora_A",)

    def client_start(
        self, received: LoraState, server: GlobalState, memory: ClientMemory, to_stage: StateMap
    ) -> LoraState:
        own_b = to_stage(memory.private) if memory.private else select(server.lora, "lora_B")
        return {**received, **own_b}

    def uplink(self, trained: LoraState, memory: ClientMemory, to_full: StateMap) -> LoraState:
        memory.private = to_full(select(trained, "lora_B"))
        return select(trained, "lora_A")

    def eval_lora(self, server: GlobalState, memories: Iterable[ClientMemory], to_stage: StateMap) -> LoraState:
        total = RunningWeightedSum()
        for memory in memories:
            if memory.private:
                total.add(to_stage(memory.private), memory.num_samples)
        own_b = total.mean() if total.weight else select(server.lora, "lora_B")
        return {**server.lora, **own_b}

    def final_upload(self, memory: ClientMemory) -> LoraState:
        return memory.private


@RULES.register("flora")
class FLoRA(AggregationRule):
    """FLoRA: stacking. The global update is the exact weighted sum of client products.

    Stacking client k's modules (A_k scaled by p_k = n_k / sum n) gives B_stack @ A_stack =
    sum_k p_k B_k A_k exactly, which clients merge into their base weights before re-initialising
    LoRA. The server keeps the stacked product as a dense running sum (``delta``): exact, and memory
    independent of the number of clients. A client receives the stacked factors of every round it
    missed, or the dense delta when that is smaller.
    """

    name = "flora"
    merges_into_base = True
    paper = "Wang et al., FLoRA: Federated Fine-Tuning LLMs with Heterogeneous Low-Rank Adaptations, NeurIPS 2024"

    def __init__(self) -> None:
        self.round_bytes: dict[int, int] = {}
        self.stage_start = 0

    def downlink(self, server: GlobalState, memory: ClientMemory, round_index: int) -> LoraState:
        # The fresh LoRA is derived from a seed on the device; what travels is the merged update.
        return {}

    def start_stage(self, first_round: int) -> None:
        self.round_bytes.clear()
        self.stage_start = first_round

    def extra_downlink_bytes(self, server: GlobalState, memory: ClientMemory, round_index: int) -> int:
        """Stacked factors of the rounds the client missed since it last synced, capped by dense."""
        since = max(memory.synced_round, self.stage_start - 1)
        missed = sum(b for r, b in self.round_bytes.items() if since < r < round_index)
        memory.synced_round = round_index - 1
        dense = sum(t.numel() * 4 for t in server.delta.values())
        return min(missed, dense)

    def client_start(
        self, received: LoraState, server: GlobalState, memory: ClientMemory, to_stage: StateMap
    ) -> LoraState:
        return dict(server.lora)

    def aggregate(
        self, server: GlobalState, updates: Iterable[tuple[LoraState, float]], round_index: int, seed: int
    ) -> GlobalState:
        total = RunningWeightedSum()
        stacked_bytes = 0
        for state, weight in updates:
            stacked_bytes += state_bytes(state)
            products = {}
            for name, entries in split_layers(state).items():
                for key, a in entries.items():
                    if key.endswith(".lora_A"):
                        module = key[: -len(".lora_A")]
                        b = entries[f"{module}.lora_B"]
                        products[f"layers.{name}.{module}.delta"] = b.double() @ a.double()
            total.add(products, weight)
        self.round_bytes[round_index] = stacked_bytes
        increment = total.mean()
        delta = {k: server.delta.get(k, 0) + v for k, v in increment.items()}
        # Fresh LoRA for the next round (A random from the round's seed, B = 0), same shapes as before.
        shapes = {
            k[: -len(".lora_A")]: (a.shape[1], server.lora[k[: -len("A")] + "B"].shape[0])
            for k, a in server.lora.items()
            if k.endswith(".lora_A")
        }
        rank = next(a.shape[0] for k, a in server.lora.items() if k.endswith(".lora_A"))
        fresh = init_lora_state(shapes, rank, seed)
        return GlobalState(lora=fresh, delta=delta)
