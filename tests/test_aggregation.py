"""Aggregation rules against hand computation."""

from __future__ import annotations

import pytest
import torch

from devft_edge.aggregation import RULES, ClientMemory, GlobalState, RunningWeightedSum
from devft_edge.errors import ConfigError, UnknownVariantError


def _state(a, b):
    return {"layers.0.q.lora_A": torch.tensor(a), "layers.0.q.lora_B": torch.tensor(b)}


ident = lambda s: s  # noqa: E731  (stage space == full space in these tests)


def test_fedit_is_sample_weighted_mean_of_a_and_b():
    rule = RULES.get("fedit")
    server = GlobalState(lora=_state([[0.0, 0.0]], [[0.0], [0.0]]))
    updates = [(_state([[1.0, 2.0]], [[1.0], [0.0]]), 1.0), (_state([[4.0, 8.0]], [[0.0], [3.0]]), 3.0)]
    new = rule.aggregate(server, iter(updates), round_index=0, seed=0)
    torch.testing.assert_close(new.lora["layers.0.q.lora_A"], torch.tensor([[3.25, 6.5]]))
    torch.testing.assert_close(new.lora["layers.0.q.lora_B"], torch.tensor([[0.25], [2.25]]))


def test_fedsa_shares_only_a_and_clients_keep_b():
    rule = RULES.get("fedsa")
    server = GlobalState(lora=_state([[0.0, 0.0]], [[0.0], [0.0]]))
    mems = [ClientMemory(num_samples=1), ClientMemory(num_samples=3)]
    assert set(rule.downlink(server, mems[0], 0)) == {"layers.0.q.lora_A"}
    trained = [_state([[1.0, 2.0]], [[1.0], [0.0]]), _state([[4.0, 8.0]], [[0.0], [3.0]])]
    sent = [rule.uplink(t, m, ident) for t, m in zip(trained, mems, strict=False)]
    assert all(set(s) == {"layers.0.q.lora_A"} for s in sent)
    new = rule.aggregate(server, zip(sent, [1.0, 3.0], strict=False), round_index=0, seed=0)
    torch.testing.assert_close(new.lora["layers.0.q.lora_A"], torch.tensor([[3.25, 6.5]]))
    # Each client starts the next round from the global A and its own B.
    start = rule.client_start(rule.downlink(new, mems[1], 1), new, mems[1], ident)
    torch.testing.assert_close(start["layers.0.q.lora_B"], torch.tensor([[0.0], [3.0]]))
    torch.testing.assert_close(start["layers.0.q.lora_A"], torch.tensor([[3.25, 6.5]]))
    # The federation's model pairs global A with the sample-weighted mean of private B.
    ev = rule.eval_lora(new, mems, ident)
    torch.testing.assert_close(ev["layers.0.q.lora_B"], torch.tensor([[0.25], [2.25]]))


def test_flora_is_exact_weighted_sum_of_products():
    rule = RULES.get("flora")
    a1, b1 = torch.randn(2, 5), torch.randn(3, 2)
    a2, b2 = torch.randn(2, 5), torch.randn(3, 2)
    server = GlobalState(lora={"layers.0.q.lora_A": torch.zeros(2, 5), "layers.0.q.lora_B": torch.zeros(3, 2)})
    rule.start_stage(0)
    updates = [
        ({"layers.0.q.lora_A": a1, "layers.0.q.lora_B": b1}, 1.0),
        ({"layers.0.q.lora_A": a2, "layers.0.q.lora_B": b2}, 3.0),
    ]
    new = rule.aggregate(server, iter(updates), round_index=0, seed=5)
    want = 0.25 * b1 @ a1 + 0.75 * b2 @ a2
    torch.testing.assert_close(new.delta["layers.0.q.delta"], want)
    # Stacking the clients' scaled factors gives the same product (the FLoRA identity).
    stacked = torch.cat([b1, b2], 1) @ torch.cat([0.25 * a1, 0.75 * a2], 0)
    torch.testing.assert_close(stacked, want)
    assert not new.lora["layers.0.q.lora_B"].any()  # fresh LoRA for the next round
    # A second round accumulates.
    new2 = rule.aggregate(new, iter([({"layers.0.q.lora_A": a1, "layers.0.q.lora_B": b1}, 2.0)]), 1, 6)
    torch.testing.assert_close(new2.delta["layers.0.q.delta"], want + b1 @ a1)
    # A client that missed round 0 is sent round 0's stacked factors.
    late = ClientMemory(num_samples=1, synced_round=-1)
    assert rule.extra_downlink_bytes(new2, late, 1) > 0
    assert rule.extra_downlink_bytes(new2, late, 1) == 0  # now synced


def test_running_sum_checks_inputs():
    total = RunningWeightedSum()
    with pytest.raises(ConfigError, match="no update"):
        total.mean()
    total.add({"x": torch.ones(2)}, 1.0)
    with pytest.raises(ConfigError, match="shape"):
        total.add({"x": torch.ones(3)}, 1.0)
    with pytest.raises(ConfigError, match="keys"):
        total.add({"y": torch.ones(2)}, 1.0)
    with pytest.raises(ConfigError, match="weight"):
        total.add({"x": torch.ones(2)}, 0.0)


def test_unknown_rule():
    with pytest.raises(UnknownVariantError, match="fedit, fedsa, flora"):
        RULES.get("fedprox")


@pytest.mark.parametrize("name", ["fedit", "fedsa", "flora"])
def test_aggregation_streams_one_update_at_a_time(name):
    """The server never holds more than the running sum and the update in hand."""
    import gc
    import weakref

    rule = RULES.get(name)
    rule.start_stage(0)
    server = GlobalState(lora={"layers.0.q.lora_A": torch.zeros(2, 5), "layers.0.q.lora_B": torch.zeros(3, 2)})
    refs: list[weakref.ref] = []

    def updates():
        for k in range(6):
            gc.collect()
            # Every update older than the previous one has been released.
            assert all(r() is None for r in refs[:-1]), f"update {k}: earlier updates still alive"
            state = {"layers.0.q.lora_A": torch.randn(2, 5), "layers.0.q.lora_B": torch.randn(3, 2)}
            refs.append(weakref.ref(state["layers.0.q.lora_A"]))
            yield rule.uplink(state, ClientMemory(num_samples=1), ident) if name == "fedsa" else state, 1.0
            del state

    rule.aggregate(server, updates(), round_index=0, seed=0)
    assert len(refs) == 6
