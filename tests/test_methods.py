"""Method names and the stage map a task carries for a rule's client half (``devft_edge.methods``)."""

from __future__ import annotations

import pytest
import torch

from devft_edge.errors import ConfigError
from devft_edge.lora import init_lora_state
from devft_edge.methods import METHODS, ClientMethod, check_method, rule_of, uses_devft

GOOD = {"rule": "fedsa", "groups": [[0, 1], [2, 3, 4], [5]], "fusion": "dblf", "beta": "auto", "transfer": "inv_n"}


def test_method_names_split_into_schedule_and_rule():
    assert [(uses_devft(m), rule_of(m)) for m in METHODS] == [
        (True, "fedit"),
        (False, "fedit"),
        (False, "fedsa"),
        (False, "flora"),
        (True, "fedit"),
        (True, "fedsa"),
        (True, "flora"),
    ]
    with pytest.raises(ConfigError, match="known: devft, fedit"):
        check_method("devft+fedavg")


def test_a_task_method_round_trips_and_maps_states_both_ways():
    method = ClientMethod.from_json(GOOD)
    assert method.to_json() == GOOD and method.groups == ((0, 1), (2, 3, 4), (5,))
    shapes = {f"layers.{i}.self_attn.{m}": (12, 16) for i in range(6) for m in ("q_proj", "v_proj")}
    full = {k: v + 0.1 if k.endswith("lora_B") else v for k, v in init_lora_state(shapes, 4, seed=1).items()}
    stage = method.to_stage(full)
    assert {k.split(".")[1] for k in stage} == {"0", "1", "2"}  # one block per group
    back = method.to_full(stage)
    assert back.keys() == full.keys()
    # inv_n: each of a group's n members gets B / n, so the group applies the change once
    assert torch.allclose(back["layers.2.self_attn.q_proj.lora_B"] * 3, stage["layers.1.self_attn.q_proj.lora_B"])
    assert torch.allclose(back["layers.5.self_attn.q_proj.lora_B"], full["layers.5.self_attn.q_proj.lora_B"])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rule": "fedavg"}, "method.rule"),
        ({"fusion": 3}, "method.fusion"),
        ({"transfer": "swap"}, "method.transfer"),
        ({"beta": 0}, "method.beta"),
        ({"beta": True}, "method.beta"),
        ({"groups": [[0, 2]]}, "partition"),  # layer 1 missing
        ({"groups": [[0], [0, 1]]}, "partition"),
        ({"groups": [[0], []]}, "partition"),
        ({"groups": [["0"]]}, "partition"),
        ({"groups": [list(range(5000))]}, "partition"),
    ],
)
def test_a_bad_task_method_is_refused_with_its_field(change, named):
    bad = {**GOOD, **change}
    with pytest.raises(ConfigError, match=named):
        ClientMethod.from_json(bad)
    with pytest.raises(ConfigError, match="object"):
        ClientMethod.from_json(["fedit"])
