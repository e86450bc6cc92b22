"""The distributed system end to end: a real mosquitto, the aggregator and agents as real processes.

Tiny model, two devices, two stages: the run finishes and exports an adapter that stock peft
loads; killing the aggregator with SIGKILL while a round has accepted updates and restarting it
loses none of them, counts none twice, and ends where the same run without the crash ends.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from system_harness import enrolled, free_port, mosquitto, needs_mosquitto, read_state, start, write_configs

pytestmark = needs_mosquitto


def test_run_finishes_and_survives_aggregator_kill(tmp_path, broker):
    """The crashed run next to the same run without a crash (on its own broker, at the same time):
    the same devices in every round (selection is deterministic by seed) and the same losses."""
    clean = tmp_path / "clean"
    clean.mkdir()
    clean_broker = contextlib.ExitStack()
    clean_agg, clean_agents = write_configs(clean, clean_broker.enter_context(mosquitto(clean / "broker")))
    agg_config, agent_configs = write_configs(tmp_path, broker)
    agents = [start("agent", "--config", str(c), log=tmp_path / f"{c.stem}.log") for c in agent_configs]
    agents += [start("agent", "--config", str(c), log=clean / f"{c.stem}.log") for c in clean_agents]
    reference = start("serve", "--config", str(clean_agg), log=clean / "serve.log")
    try:
        server = start("serve", "--config", str(agg_config), log=tmp_path / "serve-1.log")
        deadline = time.time() + 240
        killed_with: dict = {}
        while time.time() < deadline and server.poll() is None:
            state = read_state(tmp_path)
            open_round = state.get("open_round") or {}
            if state.get("rounds_done", 0) >= 1 and open_round.get("accepted"):
                server.send_signal(signal.SIGKILL)
                server.wait()
                killed_with = state
                break
            time.sleep(0.05)
        assert killed_with, (tmp_path / "serve-1.log").read_text()[-3000:]
        server = start("serve", "--config", str(agg_config), log=tmp_path / "serve-2.log")
        assert server.wait(timeout=300) == 0, (tmp_path / "serve-2.log").read_text()[-3000:]
        assert reference.wait(timeout=300) == 0, (clean / "serve.log").read_text()[-3000:]
    finally:
        for process in agents + [reference]:
            process.terminate()
        for process in agents + [reference]:
            process.wait(timeout=30)
        clean_broker.close()
    final = read_state(tmp_path)
    assert final["finished"] and final["rounds_done"] == 4 and final["stage"] == 2
    history = final["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    interrupted = killed_with["open_round"]
    before_kill = set(interrupted["accepted"])
    resumed = next(h for h in history if h["round"] == interrupted["index"])
    assert before_kill <= set(resumed["devices"])  # nothing accepted was lost
    assert all(len(h["devices"]) == len(set(h["devices"])) <= 2 for h in history)  # nothing counted twice
    assert (tmp_path / "agg" / "out" / "adapter" / "adapter_config.json").exists()
    assert all(h["eval_loss"] > 0 for h in history)
    log = (tmp_path / "serve-2.log").read_text()
    assert "finished" in log
    clean_final = read_state(clean)
    without_crash = clean_final["history"]
    # the stage open at the kill closed after the restart with the record it was shipped with
    kept = ("stage", "layers", "rounds", "groups", "local_steps", "pack_bytes", "predicted_peak_bytes")
    records = [[{k: s[k] for k in kept} for s in run["stages"]] for run in (final, clean_final)]
    assert records[0] == records[1]
    assert [s["stage"] for s in final["stages"]] == [1, 2] and all(s["pack_bytes"] > 0 for s in final["stages"])
    assert [h["devices"] for h in history] == [h["devices"] for h in without_crash]
    assert [h["eval_loss"] for h in history] == pytest.approx([h["eval_loss"] for h in without_crash], rel=1e-5)
    _check_adapter_loads_in_peft(tmp_path / "agg")


def _check_adapter_loads_in_peft(agg: Path) -> None:
    """Stock peft loads the exported adapter onto the base model: it changes the logits, exactly as
    the run's final full-depth LoRA state does."""
    import torch
    from peft import PeftModel

    from devft_edge.lora import LoraSettings, lora_applied
    from devft_edge.models import load_model
    from devft_edge.weights import read_safetensors

    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    base = load_model("tiny", seed=0)
    final = read_safetensors(
        agg / "state" / "blobs" / json.loads((agg / "state" / "state.json").read_text())["full_lora"]
    )
    with torch.no_grad():
        plain = base(ids).logits
        with lora_applied(base, LoraSettings(rank=8, alpha=16.0), final) as adapted:
            want = adapted(ids).logits
        loaded = PeftModel.from_pretrained(base, agg / "out" / "adapter")
        got = loaded(ids).logits
    assert not torch.allclose(got, plain, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_embedded_broker_serves_a_run_and_status_reports_it(tmp_path):
    """No broker configured: serve starts the embedded amqtt broker (MQTT 3.1.1), the agents use
    it, and `devft-edge status` reads the aggregator's retained status from it.

    The quorum is two devices and only one agent runs while status is asked, so the aggregator is
    certainly alive (waiting for a second device) when the status command connects; then the
    second agent starts and the run completes."""
    pytest.importorskip("amqtt")
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    agg_config, agent_configs = write_configs(tmp_path, url, devices=2, rounds=4, quorum=2)
    data = yaml.safe_load(agg_config.read_text())
    del data["broker"]
    agg_config.write_text(yaml.safe_dump(data))
    server = start("serve", "--config", str(agg_config), "--embedded-port", str(port), log=tmp_path / "serve.log")
    agents = [start("agent", "--config", str(agent_configs[0]), log=tmp_path / "dev-0.log")]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and server.poll() is None:
            state = read_state(tmp_path)
            if state.get("stage", 0) >= 1 and state.get("devices", {}).get("dev-0", {}).get("online"):
                break
            time.sleep(0.05)
        status = subprocess.run(
            [sys.executable, "-m", "devft_edge", "status", "--broker", url, "--fleet", "t", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert not read_state(tmp_path).get("open_round")  # still waiting for the quorum
        agents.append(start("agent", "--config", str(agent_configs[1]), log=tmp_path / "dev-1.log"))
        assert server.wait(timeout=240) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(timeout=30)
    assert "embedded broker on" in (tmp_path / "serve.log").read_text()
    assert status.returncode == 0, status.stderr[-2000:]
    doc = json.loads(status.stdout)
    assert doc["run"] == "test-run" and doc["stage"] == 1 and doc["rounds"] == 4 and doc["boot"]
    assert doc["devices_online"] == ["dev-0"]
    assert read_state(tmp_path)["finished"]


def test_a_device_that_dies_mid_run_is_replaced_by_waiting_then_going_on(tmp_path, broker):
    """SIGKILL one of two agents after the first round: its last will marks it offline, the
    aggregator waits `selection_wait_s` for two devices, then runs the remaining rounds with one."""
    agg_config, agent_configs = write_configs(tmp_path, broker, devices=2, rounds=4)
    data = yaml.safe_load(agg_config.read_text())
    data.update(selection_wait_s=2.0, round_timeout_s=20.0)
    agg_config.write_text(yaml.safe_dump(data))
    agents = [start("agent", "--config", str(c), log=tmp_path / f"{c.stem}.log") for c in agent_configs]
    server = start("serve", "--config", str(agg_config), log=tmp_path / "serve.log")
    try:
        deadline = time.time() + 120
        while read_state(tmp_path).get("rounds_done", 0) < 1 and time.time() < deadline and server.poll() is None:
            time.sleep(0.05)
        agents[1].send_signal(signal.SIGKILL)
        assert server.wait(timeout=300) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        for agent in agents:
            agent.kill()
            agent.wait(timeout=30)
    history = read_state(tmp_path)["history"]
    assert len(history) == 4 and history[0]["devices"] == ["dev-0", "dev-1"]
    assert history[-1]["devices"] == ["dev-0"]  # the dead device no longer gets tasks
    log = (tmp_path / "serve.log").read_text()
    assert "going on with them" in log or "closing at quorum" in log


def test_stop_after_ends_a_fleet_run_after_that_stage_and_exports(tmp_path, broker):
    """``stop_after`` works over the network as in the simulator: the run ends after stage 1's
    hand-over (stage 2's round is never opened) and exports the full model's adapter."""
    agg_config, agent_configs = write_configs(tmp_path, broker, devices=1, rounds=2, stop_after=1)
    agents = [start("agent", "--config", str(c), log=tmp_path / f"{c.stem}.log") for c in agent_configs]
    server = start("serve", "--config", str(agg_config), log=tmp_path / "serve.log")
    try:
        assert server.wait(timeout=300) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        for agent in agents:
            agent.terminate()
            agent.wait(timeout=30)
    state = read_state(tmp_path)
    assert state["finished"] and [h["stage"] for h in state["history"]] == [1] and state["stage"] == 1
    summary = json.loads((tmp_path / "agg" / "out" / "summary.json").read_text())
    assert len(summary["stages"]) == 1 and summary["stages"][0]["full_eval_loss"] is not None
    assert (tmp_path / "agg" / "out" / "adapter" / "adapter_config.json").exists()


def test_a_straggler_never_answering_is_closed_out_at_the_deadline(tmp_path, broker):
    """A device that says hello but never trains: rounds it is selected for close at their deadline
    with the quorum of updates, and a late update from it would be stale."""
    import paho.mqtt.client as paho

    from devft_edge.profiles import load_profile
    from devft_edge.protocol import Envelope, Kind, seal

    agg_config, agent_configs = write_configs(tmp_path, broker, devices=1, rounds=2)
    data = yaml.safe_load(agg_config.read_text())
    data.update(per_round=2, quorum=1, round_timeout_s=4.0)
    agg_config.write_text(yaml.safe_dump(data))
    host, port = broker.removeprefix("mqtt://").split(":")
    silent = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="silent")
    silent.connect(host, int(port))
    silent.loop_start()
    profile = load_profile("x86-cpu").model_dump(mode="json", exclude={"name"})
    hello = Envelope(kind=Kind.HELLO, sender="silent", data={"profile": profile, "backends": ["torch"]})
    key = enrolled(tmp_path, "silent")
    agents = [start("agent", "--config", str(c), log=tmp_path / f"{c.stem}.log") for c in agent_configs]
    server = start("serve", "--config", str(agg_config), log=tmp_path / "serve.log")
    try:
        deadline = time.time() + 120
        while not read_state(tmp_path).get("stage") and time.time() < deadline:  # subscribed and packing
            time.sleep(0.05)
        topic = "devft/t/dev/silent/up"
        silent.publish(topic, seal(hello.encode(), topic, key), qos=1).wait_for_publish(5)
        assert server.wait(timeout=300) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        silent.loop_stop()
        for agent in agents:
            agent.terminate()
            agent.wait(timeout=30)
    history = read_state(tmp_path)["history"]
    assert len(history) == 2 and all(h["devices"] == ["dev-0"] for h in history)
    log = (tmp_path / "serve.log").read_text()
    assert "tasks to dev-0, silent" in log and "closing at quorum" in log


def test_a_nan_update_is_pulled_validated_and_rejected(tmp_path, broker):
    """A device that follows the protocol but uploads NaN LoRA: the aggregator pulls the blob,
    rejects it with `not_finite` (the device gets that verdict), and closes the round at quorum."""
    import hashlib
    import queue

    import paho.mqtt.client as paho
    import torch
    from safetensors.torch import load, save

    from devft_edge.blobs import BlobInfo
    from devft_edge.profiles import load_profile
    from devft_edge.protocol import Envelope, Kind, decode, seal, unseal

    agg_config, agent_configs = write_configs(tmp_path, broker, devices=1, rounds=1)
    key = enrolled(tmp_path, "nan")
    data = yaml.safe_load(agg_config.read_text())
    data.update(per_round=2, quorum=1, round_timeout_s=6.0, stages=1, method="fedit")
    agg_config.write_text(yaml.safe_dump(data))
    host, port = broker.removeprefix("mqtt://").split(":")
    inbox: queue.Queue = queue.Queue()
    rogue = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="nan")
    rogue.on_message = lambda client, userdata, message: inbox.put(decode(unseal(message.payload, message.topic, None)))
    rogue.connect(host, int(port))
    rogue.subscribe("devft/t/dev/nan/down", qos=1)
    rogue.loop_start()

    def send(message: Envelope) -> None:
        rogue.publish("devft/t/dev/nan/up", seal(message.encode(), "devft/t/dev/nan/up", key), qos=1)

    profile = load_profile("x86-cpu").model_dump(mode="json", exclude={"name"})
    agents = [start("agent", "--config", str(c), log=tmp_path / f"{c.stem}.log") for c in agent_configs]
    server = start("serve", "--config", str(agg_config), log=tmp_path / "serve.log")
    verdict = None
    try:
        deadline = time.time() + 120
        while not read_state(tmp_path).get("stage") and time.time() < deadline:
            time.sleep(0.05)
        send(Envelope(kind=Kind.HELLO, sender="nan", data={"profile": profile}))
        chunks: dict[int, bytes] = {}
        poisoned = b""
        while verdict is None and time.time() < deadline:
            message = inbox.get(timeout=60)
            if message.kind is Kind.TASK:
                task, lora = message, BlobInfo.from_json(message.data["lora"])
                send(task.reply(Kind.CHUNK_REQUEST, "nan", data={**lora.to_json(), "missing": list(range(lora.count))}))
            elif message.kind is Kind.CHUNK and message.data["blob"] == lora.sha256:
                chunks[message.data["index"]] = message.body
                if len(chunks) == lora.count:
                    state = load(b"".join(chunks[i] for i in range(lora.count)))
                    first = sorted(state)[0]
                    state[first] = torch.full_like(state[first], float("nan"))
                    poisoned = save(state)
                    info = BlobInfo(hashlib.sha256(poisoned).hexdigest(), len(poisoned), 65536)
                    send(task.reply(Kind.UPDATE, "nan", data={**info.to_json(), "num_samples": 10, "train_loss": 1.0}))
            elif message.kind is Kind.CHUNK_REQUEST:
                for index in message.data["missing"]:
                    body = poisoned[index * 65536 : (index + 1) * 65536]
                    send(message.reply(Kind.CHUNK, "nan", data={**info.to_json(), "index": index}, body=body))
            elif message.kind is Kind.VERDICT:
                verdict = message
        assert server.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        rogue.loop_stop()
        for agent in agents:
            agent.terminate()
            agent.wait(timeout=30)
    assert verdict is not None and verdict.data["accepted"] is False and verdict.reason.value == "not_finite"
    history = read_state(tmp_path)["history"]
    assert [h["devices"] for h in history] == [["dev-0"]]
    assert "rejected: not_finite" in (tmp_path / "serve.log").read_text()
