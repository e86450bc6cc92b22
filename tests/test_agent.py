"""The device agent's reading of a task: a malformed ``train`` object is refused with its reason."""

from __future__ import annotations

import pytest

from devft_edge.protocol import Envelope, Kind, ProtocolError, Reason
from device_agent.agent import task_settings

GOOD = {"steps": 8, "batch": 4, "seq": 64, "lr": 3e-4}


def _task(train: object) -> Envelope:
    return Envelope(kind=Kind.TASK, sender="aggregator", run="r", stage=1, round=0, data={"train": train})


def test_a_well_formed_task_gives_its_settings() -> None:
    settings = task_settings(_task({**GOOD, "checkpointing": True}))
    assert (settings.steps, settings.batch_size, settings.seq_len, settings.lr) == (8, 4, 64, 3e-4)
    assert settings.checkpointing is True
    assert task_settings(_task(GOOD)).checkpointing is False  # older aggregators do not send it


@pytest.mark.parametrize(
    ("train", "named"),
    [
        (None, "no 'train' object"),
        ({**GOOD, "steps": "8"}, "train.steps"),
        ({k: v for k, v in GOOD.items() if k != "seq"}, "train.seq"),
        ({**GOOD, "batch": True}, "train.batch"),
        ({**GOOD, "checkpointing": "yes"}, "train.checkpointing"),
        ({**GOOD, "steps": 0}, "local steps must be >= 1"),
        ({**GOOD, "lr": float("nan")}, "lr must be a positive number"),
    ],
)
def test_a_malformed_train_object_is_refused_naming_the_field(train: object, named: str) -> None:
    with pytest.raises(ProtocolError) as error:
        task_settings(_task(train))
    assert error.value.reason is Reason.MALFORMED and named in str(error.value)
