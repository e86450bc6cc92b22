"""Device profiles: every shipped file is valid, and broken files are reported by file and field.

Fast: no model is loaded. Broken profiles are written into ``tmp_path`` from a copy of the shipped
``rpi4-4gb.yaml`` with one change each. Run this file as a script to print the table of shipped
profiles that ``docs/profiles.md`` carries (``test_docs_table_matches_profiles`` keeps them equal).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from devft_edge.errors import ConfigError
from devft_edge.profiles import (
    GB,
    PROFILES_DIR,
    SOURCE_KEYS,
    DeviceProfile,
    available_profiles,
    dump_profile,
    load_profile,
    load_profile_file,
    load_profiles,
    parse_profile,
)

SHIPPED = (
    "rpi4-2gb",
    "rpi4-4gb",
    "rpi4-8gb",
    "rpi5-4gb",
    "rpi5-8gb",
    "rpi5-16gb",
    "jetson-nano-4gb",
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-32gb",
    "jetson-agx-orin-64gb",
    "x86-cpu",
)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "profiles.md"


def base_data() -> dict:
    """A valid profile as a plain mapping (the shipped rpi4-4gb)."""
    return yaml.safe_load((PROFILES_DIR / "rpi4-4gb.yaml").read_text())


def write_profile(directory: Path, name: str, change: Callable[[dict], object] = lambda d: None) -> Path:
    """Write ``base_data()`` with ``change`` applied as ``directory/name.yaml``."""
    data = copy.deepcopy(base_data())
    change(data)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(path: str | Path, extra_dirs: tuple = ()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_profile(path, extra_dirs)
    return caught.value.problems


# --- the shipped profiles ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(available_profiles()))
def test_shipped_profile_loads(name):
    path = available_profiles()[name]
    profile = load_profile(name)
    assert isinstance(profile, DeviceProfile)
    assert profile.name == name == path.stem
    assert profile.budget_bytes > 0
    assert profile.budget_bytes == int((profile.memory.total_gb - profile.memory.reserved_gb) * GB)
    assert load_profile(path) == profile  # by path, the same profile


def test_expected_profiles_are_shipped():
    missing = set(SHIPPED) - set(available_profiles())
    assert not missing, f"missing shipped profiles: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(available_profiles()))
def test_shipped_profile_conventions(name):
    """Figures that are estimates say so, and nf4 is only offered where training runs on CUDA."""
    profile = load_profile(name)
    for key in SOURCE_KEYS:
        assert profile.sources[key].strip(), key
    for key in ("reserved", "compute", "network"):
        assert profile.sources[key].startswith("estimate"), f"{name}: sources.{key} should say it is an estimate"
    if "nf4" in profile.quantizations:
        assert profile.compute.backend == "cuda"
    if profile.accelerator.kind == "none":
        assert profile.compute.backend == "cpu"


def test_jetson_nano_trains_on_its_cpu():
    """JetPack 4 (Python 3.6, CUDA 10.2) cannot run the agent on the Maxwell GPU."""
    nano = load_profile("jetson-nano-4gb")
    assert nano.accelerator.kind == "cuda" and nano.accelerator.compute_capability == "5.3"
    assert nano.compute.backend == "cpu"
    assert "nf4" not in nano.quantizations


@pytest.mark.parametrize("name", sorted(available_profiles()))
def test_dump_profile_round_trips(name):
    profile = load_profile(name)
    text = dump_profile(profile)
    assert "name" not in yaml.safe_load(text)  # the name is the file stem, not a field
    assert parse_profile(yaml.safe_load(text), name) == profile


def test_dump_profile_round_trips_through_a_file(tmp_path):
    profile = load_profile("jetson-orin-nano-8gb")
    path = tmp_path / "copy.yaml"
    path.write_text(dump_profile(profile))
    again = load_profile_file(path)
    assert again.name == "copy"
    assert again.model_dump(exclude={"name"}) == profile.model_dump(exclude={"name"})


# --- errors name the file and the field -------------------------------------------------------


def _set(section: str, **values) -> Callable[[dict], None]:
    return lambda d: d[section].update(values)


ERRORS = {
    "missing-field": (lambda d: d["memory"].pop("total_gb"), ["memory.total_gb", "Field required"]),
    "missing-section": (lambda d: d.pop("network"), ["network", "Field required"]),
    "negative-memory": (_set("memory", total_gb=-4), ["memory.total_gb", "greater than 0"]),
    "negative-reserved": (_set("memory", reserved_gb=-0.5), ["memory.reserved_gb", "greater than or equal to 0"]),
    "reserved-equals-total": (_set("memory", reserved_gb=4.0), ["memory: ", "reserved_gb=4.0", "total_gb=4.0"]),
    "reserved-above-total": (_set("memory", reserved_gb=6.0), ["memory: ", "reserved_gb=6.0"]),
    "typo-nested": (_set("memory", totl_gb=4.0), ["memory.totl_gb", "Extra inputs are not permitted"]),
    "typo-top-level": (lambda d: d.update(storage_gib=32), ["storage_gib", "Extra inputs are not permitted"]),
    "unknown-arch": (_set("cpu", arch="riscv64"), ["cpu.arch", "aarch64"]),
    "unknown-quantization": (lambda d: d.update(quantizations=["none", "int3"]), ["quantizations.1", "nf4"]),
    "nf4-without-cuda": (lambda d: d.update(quantizations=["none", "nf4"]), ["quantizations", "nf4", "CUDA"]),
    "cuda-backend-without-cuda": (_set("compute", backend="cuda"), ["compute.backend", "accelerator.kind"]),
    "compute-capability-missing": (
        lambda d: d.update(accelerator={"kind": "cuda"}),
        ["accelerator: ", "compute_capability is required"],
    ),
    "compute-capability-on-cpu": (_set("accelerator", compute_capability="8.7"), ["accelerator: ", "absent"]),
    "compute-capability-malformed": (
        lambda d: d.update(accelerator={"kind": "cuda", "compute_capability": "sm_87"}),
        ["accelerator.compute_capability", "pattern"],
    ),
    "empty-source": (_set("sources", network="  "), ["sources", "network"]),
    "missing-source": (lambda d: d["sources"].pop("reserved"), ["sources", "reserved"]),
    "null-source": (_set("sources", memory=None), ["sources.memory", "valid string"]),
    "zero-gflops": (_set("compute", sustained_gflops=0), ["compute.sustained_gflops", "greater than 0"]),
    "string-for-number": (_set("network", uplink_mbps="fast"), ["network.uplink_mbps", "valid number"]),
    # absurd but finite numbers once passed, were saved with the device, and overflowed planning (issue 14)
    "absurd-bandwidth": (_set("network", downlink_mbps=1e300), ["network.downlink_mbps", "less than or equal"]),
    "absurd-reserve": (_set("memory", reserved_gb=1e12), ["memory.reserved_gb", "less than or equal"]),
    "infinite-storage": (lambda d: d.update(storage_gb=float("inf")), ["storage_gb", "less than or equal"]),
    "absurd-measured-step": (
        lambda d: d.update(
            measured_step={
                "model": "smollm2",
                "layers": 10**18,
                "batch": 4,
                "seq": 64,
                "quant": "none",
                "peak_bytes": 10**9,
                "step_seconds": 1.0,
            }
        ),
        ["measured_step.layers", "less than or equal"],
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_names_file_and_field(tmp_path, case):
    change, expected = ERRORS[case]
    path = write_profile(tmp_path, case, change)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.startswith(f"{path}: "), problem
    for text in expected:
        assert text in problem, f"{text!r} not in {problem!r}"


def test_error_by_name_from_profiles_dir(tmp_path):
    path = write_profile(tmp_path, "broken", _set("memory", total_gb=-1))
    (problem,) = problems_of("broken", (tmp_path,))
    assert problem.startswith(f"{path}: memory.total_gb: ")


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- memory\n- cpu\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: ") and "mapping" in problem and "list" in problem


def test_empty_file_is_not_a_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: ") and "mapping" in problem


def test_invalid_yaml_syntax(tmp_path):
    path = tmp_path / "syntax.yaml"
    path.write_text("description: x\nmemory: {total_gb: 4.0, reserved_gb: 0.6\ncpu:\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: not valid YAML")
    assert "line" in problem  # YAML's own position of the error


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: cannot read profile")


def test_unreadable_file(tmp_path):
    path = tmp_path / "folder.yaml"
    path.mkdir()  # a directory cannot be read as a file, even by root
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: cannot read profile")


def test_several_problems_in_one_file_reported_together(tmp_path):
    def break_three(d: dict) -> None:
        d["memory"]["total_gb"] = -1
        d["cpu"]["arch"] = "mips"
        d["storage_gib"] = 32

    path = write_profile(tmp_path, "many", break_three)
    problems = problems_of(path)
    assert all(p.startswith(f"{path}: ") for p in problems), problems
    text = "\n".join(problems)
    for field in ("memory.total_gb", "cpu.arch", "storage_gib"):
        assert f": {field}: " in text, field


def test_load_profiles_reports_every_bad_file(tmp_path):
    first = write_profile(tmp_path, "first", _set("memory", total_gb=-1))
    second = write_profile(tmp_path, "second", _set("cpu", cores=0))
    with pytest.raises(ConfigError) as caught:
        load_profiles(["first", "rpi4-4gb", "second"], (tmp_path,))
    problems = caught.value.problems
    assert any(p.startswith(f"{first}: memory.total_gb: ") for p in problems), problems
    assert any(p.startswith(f"{second}: cpu.cores: ") for p in problems), problems
    assert str(first) in str(caught.value) and str(second) in str(caught.value)


def test_load_profiles_in_order():
    profiles = load_profiles(["x86-cpu", "rpi4-4gb"])
    assert [p.name for p in profiles] == ["x86-cpu", "rpi4-4gb"]


# --- where profiles are found -----------------------------------------------------------------


def test_user_profiles_dir_adds_a_profile(tmp_path):
    path = write_profile(tmp_path, "my-board", _set("memory", total_gb=2.0, reserved_gb=0.5))
    assert available_profiles((tmp_path,))["my-board"] == path
    assert "my-board" not in available_profiles()
    profile = load_profile("my-board", (tmp_path,))
    assert profile.name == "my-board"
    assert profile.budget_bytes == int(1.5 * GB)


def test_user_profile_shadows_shipped_one(tmp_path):
    path = write_profile(tmp_path, "rpi4-4gb", lambda d: d.update(description="my own Pi 4"))
    assert available_profiles((tmp_path,))["rpi4-4gb"] == path
    assert load_profile("rpi4-4gb", (tmp_path,)).description == "my own Pi 4"
    assert load_profile("rpi4-4gb").description != "my own Pi 4"
    # other shipped profiles stay visible
    assert set(SHIPPED) <= set(available_profiles((tmp_path,)))


def test_earlier_user_dir_wins(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write_profile(first, "board", lambda d: d.update(description="from a"))
    write_profile(second, "board", lambda d: d.update(description="from b"))
    assert load_profile("board", (first, second)).description == "from a"


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as caught:
        load_profile("rpi9-128gb")
    message = str(caught.value)
    assert "rpi9-128gb" in message
    for name in available_profiles():
        assert name in message


def test_missing_profiles_dir_is_an_error(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(ConfigError) as caught:
        load_profile("rpi4-4gb", (missing,))
    assert str(missing) in str(caught.value) and "no such directory" in str(caught.value)


def test_only_yaml_files_are_profiles(tmp_path):
    (tmp_path / "notes.txt").write_text("not a profile\n")
    assert "notes" not in available_profiles((tmp_path,))


# --- docs/profiles.md -------------------------------------------------------------------------


def _number(value: float) -> str:
    return f"{round(value, 2):g}"


def profiles_table() -> str:
    """The markdown table of shipped profiles in docs/profiles.md, built from the files."""
    rows = [
        "| profile | total GB | reserved GB | budget GB | cores | accelerator | backend | quantizations "
        "| sustained GFLOP/s |",
        "|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for name in available_profiles():
        p = load_profile(name)
        accelerator = p.accelerator.kind
        if p.accelerator.compute_capability:
            accelerator += f" {p.accelerator.compute_capability}"
        cells = [
            f"`{name}`",
            _number(p.memory.total_gb),
            _number(p.memory.reserved_gb),
            _number(p.memory.total_gb - p.memory.reserved_gb),
            str(p.cpu.cores),
            accelerator,
            p.compute.backend,
            ", ".join(p.quantizations),
            _number(p.compute.sustained_gflops),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def test_docs_table_matches_profiles():
    assert profiles_table() in DOCS.read_text(), (
        "docs/profiles.md is out of date: paste the output of `python tests/test_profiles.py`"
    )


if __name__ == "__main__":
    print(profiles_table(), end="")
