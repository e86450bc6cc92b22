"""Client selection and seeds, shared by the simulator and the aggregator (``devft_edge.selection``)."""

from __future__ import annotations

import random

from devft_edge.selection import data_seed, natural_key, select_clients, training_seed


def test_ids_sort_by_the_value_of_their_numbers():
    ids = [f"dev-{i}-rpi5" for i in (10, 2, 0, 1)]
    assert sorted(ids, key=natural_key) == ["dev-0-rpi5", "dev-1-rpi5", "dev-2-rpi5", "dev-10-rpi5"]


def test_the_fleet_draws_what_the_simulator_draws_in_any_hello_order():
    """Device ``dev-<i>-...`` is selected exactly when simulated client ``i`` is, whatever order the
    devices said hello in; the draw depends on the seed and the round, not on earlier rounds."""
    ids = [f"dev-{i}-p" for i in range(12)]
    for round_index in range(20):
        shuffled = random.Random(round_index).sample(ids, len(ids))
        fleet = select_clients(shuffled, 3, seed=7, round_index=round_index)
        simulated = select_clients(list(range(12)), 3, seed=7, round_index=round_index)
        assert fleet == [f"dev-{i}-p" for i in simulated]
    draws = {tuple(select_clients(list(range(12)), 3, seed=7, round_index=r)) for r in range(20)}
    assert len(draws) > 10  # rounds draw differently
    assert select_clients([3, 1], 5, seed=0, round_index=0) == [1, 3]  # fewer eligible than asked


def test_each_client_gets_its_own_seeds():
    assert len({training_seed(0, r, c) for r in range(50) for c in range(50)}) == 2500
    assert len({data_seed(s, c) for s in range(5) for c in range(100)}) == 500
