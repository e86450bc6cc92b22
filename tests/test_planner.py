"""Planning: the plan's numbers, its JSON document, advice, capped schedules, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from devft_edge.cli import main
from devft_edge.errors import ConfigError
from devft_edge.memory import RUNTIME_REFERENCE_BYTES, estimate_memory, model_shape, on_device
from devft_edge.models import load_config
from devft_edge.planner import PlanSettings, capped_capacities, fit_profile, plan
from devft_edge.profiles import load_profile


@pytest.fixture(scope="module")
def shape():
    return model_shape(load_config("smollm2"))


def test_plan_counts_and_fits(shape):
    profiles = [load_profile("rpi4-4gb"), load_profile("jetson-agx-orin-64gb")]
    result = plan(shape, "smollm2", profiles, PlanSettings(stages=4, batch=4, seq=64))
    assert [s.layers for s in result.stages] == [4, 8, 15, 30]
    assert [s.params_total for s in result.stages] == [shape.params_total(n) for n in (4, 8, 15, 30)]
    assert result.stages[-1].params_trainable == 2_442_240
    assert all(s.bytes_up == s.bytes_down == 4 * s.params_trainable for s in result.stages)
    assert all(s.pack_bytes > s.bytes_down for s in result.stages)
    big = [s.profiles["jetson-agx-orin-64gb"] for s in result.stages]
    assert all(f.fits and f.max_batch >= 4 and not f.advice for f in big)
    peaks = [s.profiles["rpi4-4gb"].peak_bytes for s in result.stages]
    assert peaks == sorted(peaks)


def test_unfit_stage_gets_advice_and_capped_schedule(shape):
    tight = load_profile("rpi4-4gb")
    result = plan(shape, "smollm2", [tight], PlanSettings(batch=16, seq=256))
    last = result.stages[-1].profiles["rpi4-4gb"]
    assert not last.fits
    assert any("--batch" in a for a in last.advice) or any("cap this device" in a for a in last.advice)
    cap = result.max_layers["rpi4-4gb"]
    assert cap < 30
    assert result.capped_capacities is not None and max(result.capped_capacities) <= max(cap, 1)


def test_unsupported_quantization_does_not_fit(shape):
    result = plan(shape, "smollm2", [load_profile("rpi5-8gb")], PlanSettings(quant="nf4"))
    fit = result.stages[0].profiles["rpi5-8gb"]
    assert not fit.fits and fit.max_batch == 0 and "cannot compute with nf4" in fit.advice[0]


def test_capped_capacities():
    assert capped_capacities((4, 8, 15, 30), 30) is None
    assert capped_capacities((4, 8, 15, 30), 12) == (4, 8, 12)
    assert capped_capacities((4, 8, 15, 30), 8) == (4, 8)
    assert capped_capacities((4, 8, 15, 30), 2) == (2,)


def test_plan_needs_profiles(shape):
    with pytest.raises(ConfigError, match="at least one device profile"):
        plan(shape, "smollm2", [], PlanSettings())


def test_cli_plan_json_schema(capsys):
    code = main(
        ["plan", "--model", "smollm2", "--profile", "rpi4-4gb", "--profile", "x86-cpu", "--quant", "int4", "--json"]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "smollm2" and len(doc["stages"]) == 4
    for stage in doc["stages"]:
        assert {
            "stage",
            "layers",
            "params_total",
            "params_trainable",
            "pack_bytes",
            "bytes_down",
            "bytes_up",
            "profiles",
        } <= set(stage)
        assert "measured_peak_bytes" not in stage
        for fit in stage["profiles"].values():
            assert {"peak_bytes", "fits", "max_batch", "step_seconds"} <= set(fit)
            assert isinstance(fit["fits"], bool) and fit["peak_bytes"] > 0 and fit["step_seconds"] > 0
    assert set(doc["stages"][0]["profiles"]) == {"rpi4-4gb", "x86-cpu"}


def test_cli_plan_text_and_errors(capsys, tmp_path):
    assert main(["plan", "--profile", "rpi4-4gb", "--stages", "2"]) == 0
    out = capsys.readouterr().out
    assert "stage 2 (30 layers)" in out and "rpi4-4gb" in out
    assert main(["plan", "--profile", "no-such-device"]) == 2
    assert "unknown device profile 'no-such-device'" in capsys.readouterr().err
    bad = tmp_path / "broken.yaml"
    bad.write_text("description: x\n")
    assert main(["plan", "--profile", "broken", "--profiles-dir", str(tmp_path)]) == 2
    assert "broken.yaml: memory: Field required" in capsys.readouterr().err


def test_cli_plan_check_on_tiny_model():
    """--check measures a real training step per stage in fresh processes and reports it."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "devft_edge",
            "plan",
            "--model",
            "tiny",
            "--profile",
            "x86-cpu",
            "--stages",
            "2",
            "--batch",
            "2",
            "--seq",
            "32",
            "--quant",
            "int8",
            "--check",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    measured = [s["measured_peak_bytes"] for s in doc["stages"]]
    predicted = [s["predicted_local_bytes"] for s in doc["stages"]]
    assert all(abs(p - m) < 0.5 * m for p, m in zip(predicted, measured, strict=True))
    assert all(200 * 2**20 < m < 4 * 2**30 for m in measured)


def test_cli_profile_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    assert (
        main(["profile", "--name", "mine", "--out", str(out), "--probe-seconds", "0.2", "--measure-step", "tiny"]) == 0
    )
    profile = load_profile("mine", [tmp_path])
    assert profile.cpu.cores >= 1 and profile.budget_bytes > 0 and profile.compute.sustained_gflops > 0
    assert profile.sources["network"].startswith("placeholder")
    # this machine's runtime, measured as the reference was: within 10% of it (323 MiB here)
    assert abs(profile.memory.runtime_mb * 2**20 / RUNTIME_REFERENCE_BYTES - 1) < 0.1, profile.memory.runtime_mb
    step = profile.measured_step
    assert step is not None and step.model == "tiny" and step.layers == 1 and step.peak_bytes > 100 * 2**20
    assert main(["plan", "--profile", "mine", "--profiles-dir", str(tmp_path), "--json"]) == 0


def test_measured_step_calibrates_step_time(shape):
    from devft_edge.profiles import MeasuredStep

    base = load_profile("rpi5-8gb")
    measured = MeasuredStep(
        model="smollm2", layers=4, batch=4, seq=64, quant="none", peak_bytes=2**30, step_seconds=7.0
    )
    profile = base.model_copy(update={"measured_step": measured})
    settings = PlanSettings(stages=4, batch=4, seq=64)
    with_measure = plan(shape, "smollm2", [profile], settings)
    without = plan(shape, "smollm2", [base], settings)
    assert with_measure.stages[0].profiles["rpi5-8gb"].step_seconds == pytest.approx(7.0, rel=1e-3)
    ratio = 7.0 / without.stages[0].profiles["rpi5-8gb"].step_seconds
    for a, b in zip(with_measure.stages, without.stages, strict=True):
        assert a.profiles["rpi5-8gb"].step_seconds == pytest.approx(
            b.profiles["rpi5-8gb"].step_seconds * ratio, rel=1e-2
        )
    other_model = plan(shape, "other", [profile], settings)  # a step measured on another model is not used
    assert (
        other_model.stages[0].profiles["rpi5-8gb"].step_seconds == without.stages[0].profiles["rpi5-8gb"].step_seconds
    )


def test_a_devices_measured_runtime_moves_its_predicted_peak_and_its_fit(shape):
    """A profile that measured its runtime 200 MiB above the calibration machine's is predicted 200
    MiB higher at every stage; one without the measurement as before; the budget decides the fit."""
    base = load_profile("rpi5-4gb")
    heavier = base.model_copy(
        update={"memory": base.memory.model_copy(update={"runtime_mb": RUNTIME_REFERENCE_BYTES // 2**20 + 200})}
    )
    settings = PlanSettings(stages=4, batch=4, seq=64)
    step = settings.step(30)
    assert estimate_memory(shape, on_device(step, base)).peak_bytes == estimate_memory(shape, step).peak_bytes
    shift = estimate_memory(shape, on_device(step, heavier)).peak_bytes - estimate_memory(shape, step).peak_bytes
    assert shift == 200 * 2**20
    with_runtime = plan(shape, "smollm2", [heavier], settings)
    without = plan(shape, "smollm2", [base], settings)
    for a, b in zip(with_runtime.stages, without.stages, strict=True):
        assert a.profiles["rpi5-4gb"].peak_bytes - b.profiles["rpi5-4gb"].peak_bytes == 200 * 2**20
    # just enough memory for the full-depth stage on the reference runtime, not on the heavier one
    need = estimate_memory(shape, on_device(step, base)).peak_bytes
    tight = {"total_gb": (need + 2**20) / 2**30 + base.memory.reserved_gb}
    fits_reference = base.model_copy(update={"memory": base.memory.model_copy(update=tight)})
    fits_not = heavier.model_copy(update={"memory": heavier.memory.model_copy(update=tight)})
    assert fit_profile(shape, step, fits_reference).fits and not fit_profile(shape, step, fits_not).fits


def test_transfer_times_follow_the_profile_links(shape):
    profile = load_profile("rpi4-4gb")
    stage = plan(shape, "smollm2", [profile], PlanSettings(quant="int4")).stages[0]
    fit = stage.profiles["rpi4-4gb"]
    down, up = profile.network.downlink_mbps * 1e6 / 8, profile.network.uplink_mbps * 1e6 / 8
    assert fit.pack_seconds == pytest.approx(stage.pack_bytes / down, abs=0.01)
    assert fit.round_transfer_seconds == pytest.approx(stage.bytes_down / down + stage.bytes_up / up, abs=0.01)
