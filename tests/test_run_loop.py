"""The round loop taken up from its record: what a service does after ``kill -9``.

A run of two rounds is resumed in a second loop from its progress, full state, open stage's groups,
global state and budget (as the aggregator checkpoints them); the next round then gives exactly
the numbers the uninterrupted loop gives. The simulator's in-process clients play the pool; their
data streams are advanced to where the first run left them (the devices keep that position).
FLoRA (its merged update must come back into the rebuilt stage model) runs in ``make test``;
FedIT, which the aggregator's kill test covers over the network, in ``make test-long``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from devft_edge.aggregation import GlobalState
from devft_edge.federation import StageBudget
from devft_edge.schedule import Plateau
from devft_edge.simulator import Simulation, SimulationConfig
from devft_edge.training import TrainSettings

CFG = dict(
    model="tiny", clients=3, per_round=2, stages=1, rounds=4, eval_examples=8, examples_per_client=8, quant="none"
)


@pytest.mark.parametrize("method", [pytest.param("fedit", marks=pytest.mark.long), "flora"])
def test_a_resumed_loop_goes_on_as_if_never_stopped(tmp_path: Path, method: str) -> None:
    cfg = SimulationConfig(method=method, train=TrainSettings(steps=2, batch_size=2, seq_len=32), **CFG)
    first = Simulation(cfg, tmp_path / "a").loop
    first.start()
    first.open_stage(1)
    first.run_round()
    first.run_round()
    stage = first.stage
    assert stage is not None and first.progress.rounds_done == 2
    record = copy.deepcopy(first.progress)
    server = GlobalState(lora=dict(stage.server.lora), delta=dict(stage.server.delta))
    budget = StageBudget(stage.opened.budget.rounds, Plateau(**vars(stage.opened.budget.plateau)))
    if method == "flora":
        assert server.delta  # the resumed stage model must get the merged update back
    expected = first.run_round()

    second_sim = Simulation(cfg, tmp_path / "b")
    second = second_sim.loop
    second.resume(record, first.full, (stage.groups, server, budget))
    second_sim.pool.ship(second.stage.opened, second.federation.builder)  # the pool's view of the stage
    for row in record.history:  # each client's stream where the first run left it
        for client in row.devices:
            for _ in range(cfg.train.steps):
                next(second_sim.pool.streams[int(client)])
    resumed = second.run_round()
    assert resumed.devices == expected.devices
    assert resumed.eval_loss == pytest.approx(expected.eval_loss, abs=1e-6)
    assert resumed.train_loss == pytest.approx(expected.train_loss, abs=1e-6)
    assert resumed.compute == pytest.approx(expected.compute) and resumed.bytes_up == expected.bytes_up
