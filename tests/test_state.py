"""The aggregator's state directory: one aggregator at a time, and checkpoints whose cost does not
grow with the traffic or the fleet (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cloud_aggregator.state import (
    MAX_CACHED,
    MAX_MESSAGE_ID_CHARS,
    SEEN_FILE,
    STATE_FILE,
    Device,
    RunState,
    SeenIds,
    load_state,
    lock_state_dir,
    open_state,
    save_device,
    save_state,
)
from devft_edge.errors import ConfigError, DataError
from devft_edge.protocol import ProtocolError, Reason


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = lock_state_dir(tmp_path / "state")
    with pytest.raises(ConfigError, match=f"in use by another aggregator \\(pid {os.getpid()}\\)"):
        lock_state_dir(tmp_path / "state")
    first.close()
    lock_state_dir(tmp_path / "state").close()  # free again once the holder is gone


def test_the_lock_ends_with_the_process_even_killed(tmp_path):
    """A kill -9 leaves the lock file behind but not the lock: a restart must not be refused."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cloud_aggregator.state import lock_state_dir; "
            f"h = lock_state_dir({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=str(holder.pid)):
            lock_state_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_state_dir(tmp_path).close()


# ---- checkpoints that stay small under a flood (issue 14, item 4) ------------------------------


def _ids(n: int, tag: str = "m") -> list[str]:
    return [f"{tag}{i:031x}" for i in range(n)]  # 32 characters, like the protocol's uuid4 hex ids


def _device(cached: int = 3) -> Device:
    return Device(
        profile={"budget_gb": 2.0, "accel": "cpu"}, last_seen=1.5, cached=[f"{i:064x}" for i in range(cached)]
    )


def test_a_checkpoint_does_not_grow_with_the_ids_remembered(tmp_path):
    """10,000 ids once made state.json 150 KB (4,096 kept, indented) and every fsync'd checkpoint
    rewrote them; now the checkpoint is the same bytes whatever the traffic, and the id log is
    fsync'd, not rewritten."""
    sizes = {}
    for n in (10, 10_000):
        state = RunState(run_id="r")
        for message_id in _ids(n):
            assert state.remember(message_id)
        save_state(tmp_path / str(n), state)
        sizes[n] = (tmp_path / str(n) / STATE_FILE).stat().st_size
    assert sizes[10_000] == sizes[10] < 64 * 1024
    log = tmp_path / "10000" / SEEN_FILE
    before = log.stat()
    for _ in range(3):
        save_state(tmp_path / "10000", state)
    after = log.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert "\n" not in (tmp_path / "10000" / STATE_FILE).read_text()  # compact JSON


def test_an_overlong_or_odd_message_id_is_refused(tmp_path):
    seen = SeenIds()
    assert seen.remember("a" * MAX_MESSAGE_ID_CHARS) and seen.remember("task-run-1-2-dev-0:x.y_z")
    for bad in ("a" * (MAX_MESSAGE_ID_CHARS + 1), "", "a\nb", "a/b", "a b", "é", "x" * 1_000_000):
        with pytest.raises(ValueError, match="message id"):
            seen.remember(bad)
    state = RunState(run_id="r")
    with pytest.raises(ProtocolError) as caught:
        state.remember("m" * 65)
    assert caught.value.reason is Reason.MALFORMED  # the service counts it as malformed, not as a crash
    save_state(tmp_path, state)
    assert (tmp_path / SEEN_FILE).read_text() == ""  # nothing refused reached the log


def test_seen_ids_survive_a_restart_and_the_log_is_compacted(tmp_path):
    state = RunState(run_id="r", seen=SeenIds(keep=100))
    save_state(tmp_path, state)
    ids = _ids(1_000)
    for message_id in ids:
        assert state.remember(message_id)
        assert len((tmp_path / SEEN_FILE).read_text().splitlines()) < 200  # never above 2 * keep
    assert not state.remember(ids[-1])
    # no checkpoint since: the ids are in the log already (a process crash loses none)
    resumed = load_state(tmp_path, seen_keep=100)
    assert resumed is not None and resumed.seen.ids() == ids[-100:]
    assert not resumed.remember(ids[-100]) and not resumed.remember(ids[-1])  # duplicates after the restart
    assert resumed.remember(ids[0])  # older than the last 100: forgotten, as bounded
    assert load_state(tmp_path).seen.ids() == [*ids[-100:], ids[0]]


def test_a_line_torn_by_a_crash_is_dropped_and_the_log_goes_on(tmp_path):
    state = RunState(run_id="r")
    save_state(tmp_path, state)
    state.remember("first")
    with (tmp_path / SEEN_FILE).open("a") as log:
        log.write("half-writ")  # the process died mid-write
    resumed = load_state(tmp_path)
    assert resumed is not None and resumed.seen.ids() == ["first"]
    assert resumed.remember("second")
    assert (tmp_path / SEEN_FILE).read_text() == "first\nsecond\n"


def test_each_hello_writes_one_small_file_and_a_restart_restores_every_device(tmp_path, monkeypatch):
    save_state(tmp_path, RunState(run_id="r"))
    state_json = (tmp_path / STATE_FILE).read_bytes()
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((str(src), str(dst))), real_replace(src, dst)))
    for i in range(1_000):
        save_device(tmp_path, f"dev-{i}", _device())
    monkeypatch.undo()
    assert [dst for _, dst in replaced] == [str(tmp_path / "devices" / f"dev-{i}.json") for i in range(1_000)]
    assert max(p.stat().st_size for p in (tmp_path / "devices").iterdir()) < 1024
    assert (tmp_path / STATE_FILE).read_bytes() == state_json  # the checkpoint was not touched
    resumed = load_state(tmp_path)
    assert resumed is not None and len(resumed.devices) == 1_000
    assert resumed.devices["dev-999"] == _device()
    save_state(tmp_path, resumed)
    assert (tmp_path / STATE_FILE).stat().st_size == len(state_json)  # devices are not in the checkpoint


def test_a_hostile_cached_list_is_capped_and_a_bad_device_file_is_skipped(tmp_path, caplog):
    save_state(tmp_path, RunState(run_id="r"))
    save_device(tmp_path, "dev-0", _device(cached=10_000))
    (tmp_path / "devices" / "dev-1.json").write_text('{"profile": {')  # torn by a power loss
    with pytest.raises(DataError, match="device id"):
        save_device(tmp_path, "../state", _device())
    resumed = load_state(tmp_path)
    assert resumed is not None and list(resumed.devices) == ["dev-0"]
    assert len(resumed.devices["dev-0"].cached) == MAX_CACHED
    assert "dev-1.json: unreadable device record skipped" in caplog.text


def test_a_version_1_state_file_loads_and_moves_devices_and_ids_out(tmp_path):
    """What aggregators wrote before: devices and seen_messages inside state.json, indented."""
    device = {"profile": {"budget_gb": 2.0}, "last_seen": 3.0, "online": False, "backends": ["torch"]}
    old = {
        "version": 1,
        "run_id": "r",
        "stage": 1,
        "stage_rounds_done": 0,
        "rounds_done": 2,
        "groups": [[0, 1], [2]],
        "full_lora": "",
        "stage_lora": "a" * 64,
        "pack": "b" * 64,
        "plan": "",
        "full_pack": "",
        "devices": {"dev-0": {**device, "cached": ["c" * 64] * 300}, "dev-1": {**device, "cached": []}},
        "open_round": {
            "index": 2,
            "selected": ["dev-0"],
            "tasks": {"dev-0": "task-r-1-2-dev-0"},
            "deadline": 9.0,
            "accepted": {"dev-0": {"blob": "d" * 64, "num_samples": 4, "message_id": "u1", "train_loss": 1.5}},
        },
        "bytes_up": 10,
        "bytes_down": 20,
        "bytes_down_pack": 5,
        "started": 1.0,
        "initial_eval": {},
        "stages": [],
        "history": [],
        "finished": False,
        "seen_messages": ["old-1", "old-2"],
        "rejected": {"duplicate": 1},
    }
    (tmp_path / STATE_FILE).write_text(json.dumps(old, indent=1))
    save_device(tmp_path, "dev-1", Device(profile={"budget_gb": 4.0}, last_seen=7.0))  # newer than state.json's
    state = load_state(tmp_path)
    assert state is not None and state.rounds_done == 2 and state.open_round is not None
    assert state.open_round.accepted["dev-0"].num_samples == 4
    assert len(state.devices["dev-0"].cached) == MAX_CACHED and not state.devices["dev-0"].online
    assert state.devices["dev-1"].profile == {"budget_gb": 4.0}
    assert not state.remember("old-2") and state.remember("new-1")
    save_state(tmp_path, state)  # the checkpoint now leaves them out...
    assert not {"devices", "seen_messages"} & set(json.loads((tmp_path / STATE_FILE).read_text()))
    again = load_state(tmp_path)  # ...and nothing is lost
    assert again is not None and set(again.devices) == {"dev-0", "dev-1"}
    assert again.seen.ids() == ["old-1", "old-2", "new-1"]
    assert again.open_round == state.open_round and again.rejected == {"duplicate": 1}


def test_open_state_starts_the_id_log_before_the_first_checkpoint(tmp_path):
    fresh = open_state(tmp_path, "r")
    assert fresh.remember("early") and (tmp_path / SEEN_FILE).read_text() == "early\n"
    save_state(tmp_path, fresh)
    resumed = open_state(tmp_path, "r")
    assert not resumed.remember("early")
    with pytest.raises(ConfigError, match="holds run 'r', not 'other'"):
        open_state(tmp_path, "other")
