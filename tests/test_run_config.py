"""One run configuration: the simulator's, the aggregator's and the demo's configs extend it, its
defaults are stated once, and the CLI options and YAML keys are made from the same fields."""

from __future__ import annotations

import argparse

import pytest
import yaml

from cloud_aggregator.config import AggregatorConfig
from devft_edge.cli.config_options import add_config_options, config_data, config_options
from devft_edge.errors import ConfigError
from devft_edge.fusion import FUSIONS
from devft_edge.healing import HealSettings
from devft_edge.ops.demo import DemoConfig, write_fleet
from devft_edge.presets import preset_data
from devft_edge.run_config import RunConfig
from devft_edge.simulator import SimulationConfig
from devft_edge.stage import PAPER_RECIPE

ENGINES = (SimulationConfig, AggregatorConfig, DemoConfig)


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_config_extends_the_run_config_without_restating_a_default(engine):
    assert issubclass(engine, RunConfig)
    for name, info in RunConfig.model_fields.items():
        mine = engine.model_fields[name]
        assert mine.annotation == info.annotation and mine.get_default(call_default_factory=True) == info.get_default(
            call_default_factory=True
        ), name


def _parse(cls: type, argv: list[str], base: dict | None = None):
    parser = argparse.ArgumentParser()
    add_config_options(parser, cls)
    return cls(**config_data(parser.parse_args(argv), cls, base))


def test_options_are_the_fields_and_only_the_given_ones_change_the_defaults():
    flags = {o.flag: ".".join(o.path) for o in config_options(SimulationConfig)}
    assert flags["--rank"] == "lora.rank" and flags["--local-steps"] == "train.steps"
    assert flags["--beta"] == "recipe.beta"
    assert flags["--heal-steps"] == "recipe.heal.steps" and flags["--clients"] == "clients"
    assert _parse(SimulationConfig, []) == SimulationConfig()
    cfg = _parse(
        SimulationConfig,
        ["--rank", "4", "--local-steps", "3", "--beta", "auto", "--capacities", "4,8", "--checkpointing"]
        + ["--heal", "adapter", "--heal-steps", "7", "--data-alpha", "0", "--client-profiles", "rpi5-8gb,x86-cpu"],
    )
    assert cfg.lora.rank == 4 and cfg.lora.alpha == RunConfig().lora.alpha and cfg.train.steps == 3
    assert cfg.train.checkpointing and cfg.recipe.beta == "auto" and cfg.capacities == (4, 8)
    assert cfg.recipe.heal == HealSettings(mode="adapter", steps=7) and cfg.data_alpha is None
    assert cfg.client_profiles == ("rpi5-8gb", "x86-cpu")


def test_a_preset_sits_between_the_defaults_and_the_options_given():
    paper = _parse(SimulationConfig, [], preset_data("paper"))
    assert paper.recipe == PAPER_RECIPE and paper.round_split == "equal" and paper.recipe.heal is None
    changed = _parse(SimulationConfig, ["--transfer", "inv_n", "--heal", "bake"], preset_data("paper"))
    assert changed.round_split == "equal" and changed.recipe.transfer == "inv_n" and changed.recipe.heal.mode == "bake"
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_data("x")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--heal-steps", "3"], "--heal-steps needs --heal bake|adapter"),
        (["--beta", "1.5"], "beta must be in (0, 1]"),
        (["--grouping", "nope"], "unknown grouping"),
        (["--per-round", "20"], "per_round must be in 1..clients"),
        (["--method", "fedavg"], "unknown method"),
        (["--rounds", "2", "--stages", "3"], "every stage needs a round"),
    ],
)
def test_bad_options_name_what_is_wrong(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        _parse(SimulationConfig, argv)


def test_fusion_parameters_are_declared_by_the_registry():
    assert FUSIONS.params("dblf") == {"beta": RunConfig().recipe.beta} and FUSIONS.params("mean") == {}
    assert RunConfig(recipe={"fusion": "mean", "beta": "auto"}).recipe.build_fusion().__class__.__name__ != "DBLF"


def test_the_demo_hands_the_aggregator_its_run_configuration_unchanged(tmp_path):
    demo = DemoConfig(model="tiny", devices=2, stages=2, rounds=3, recipe={"transfer": "inv_n", "heal": {"steps": 4}})
    aggregator_yaml, _ = write_fleet(demo, tmp_path)
    aggregator = AggregatorConfig.from_file(aggregator_yaml)
    assert aggregator.run_fields() == demo.run_fields()
    assert yaml.safe_load(aggregator_yaml.read_text())["recipe"]["heal"]["steps"] == 4


def test_an_aggregator_yaml_with_an_unknown_or_bad_key_names_it(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({"run_id": "r", "sign_key": "k", "device_keys": "d", "train": {"batch": 2}}))
    with pytest.raises(ConfigError, match="train.batch: Unexpected keyword argument"):
        AggregatorConfig.from_file(path)
    path.write_text(yaml.safe_dump({"run_id": "r", "sign_key": "k", "device_keys": "d", "lora": {"rank": 0}}))
    with pytest.raises(ConfigError, match="lora: rank must be >= 1"):
        AggregatorConfig.from_file(path)
