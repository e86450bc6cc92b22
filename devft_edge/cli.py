"""The ``devft-edge`` command line: thin wrappers over the library.

Each sub-command parses its options into the library's validated configs and calls one function;
logging is configured here and only here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devft_edge.errors import DevFTError
from devft_edge.profiles import QUANTIZATIONS

if TYPE_CHECKING:
    from devft_edge.mqtt import BrokerLogin


def _beta(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _add_delivery_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--delivery",
        choices=["stage_packs", "full_pack"],  # devft_edge.pack_size.DELIVERIES, without importing torch here
        default=default,
        help="a pack per stage, or the full pack once and a signed stage plan per stage (devices fuse)",
    )


def _add_simulation_options(p: argparse.ArgumentParser, defaults: dict[str, object]) -> None:
    from devft_edge.methods import METHODS
    from devft_edge.schedule import DEFAULT_MIN_DELTA

    d = defaults
    p.add_argument("--model", default=d["model"], help="smollm2 | tiny[-llama|-qwen2|-gpt2|-gpt_neox|-phi3] | PATH")
    p.add_argument("--method", default=d["method"], help=f"one of {', '.join(METHODS)}")
    p.add_argument("--clients", type=int, default=d["clients"], help="simulated clients N")
    p.add_argument("--per-round", type=int, default=d["per_round"], help="clients sampled per round K")
    p.add_argument("--stages", type=int, default=d["stages"], help="DevFT stages S")
    p.add_argument("--rounds", type=int, default=d["rounds"], help="total round budget, split over stages")
    p.add_argument("--local-steps", type=int, default=d["local_steps"], help="optimizer steps per client round")
    p.add_argument("--batch", type=int, default=d["batch"], help="examples per step")
    p.add_argument("--seq", type=int, default=d["seq"], help="tokens per example")
    p.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--targets", default=None, help="comma-separated LoRA targets (default: all block projections)")
    p.add_argument(
        "--preset",
        choices=["default", "paper"],
        default="default",
        help="paper: the paper's literal DevFT (equal round split, copy transfer, no healing, no kept ends); "
        "options given explicitly override the preset",
    )
    p.add_argument("--similarity", default=None, help="layer similarity: cka (default) | weights")
    p.add_argument(
        "--grouping", default=None, help="contiguous (default) | contiguous_ratiocut | spectral | random | even"
    )
    p.add_argument("--fusion", default=None, help="dblf (default) | one | sum | mean")
    p.add_argument("--beta", type=_beta, default=None, help="DBLF beta in (0, 1] or 'auto' (default 0.1)")
    p.add_argument("--transfer", default=None, help="knowledge transfer: copy (the paper) | inv_n (B/n per member)")
    p.add_argument("--keep-ends", type=int, default=None, help="keep the first and last k layers unfused")
    p.add_argument("--heal", choices=["off", "bake", "adapter"], default=None, help="heal fused submodels (server)")
    p.add_argument("--heal-steps", type=int, default=None, help="distillation steps per stage submodel")
    p.add_argument("--heal-rank", type=int, default=None, help="rank of the heal adapter (--heal adapter)")
    p.add_argument("--capacities", default=None, help="comma-separated stage depths, e.g. 8,15,30")
    p.add_argument("--stage-steps", choices=["fixed", "compute"], default=None, help="local steps per stage round")
    p.add_argument("--quant", choices=QUANTIZATIONS, default="none", help="pack quantization (bytes, trained base)")
    _add_delivery_option(p, "stage_packs")
    p.add_argument(
        "--exact-match",
        choices=["every_eval", "stage_end"],
        default="every_eval",
        help="measure exact match at every evaluation, or only at each stage's end (eval loss always)",
    )
    p.add_argument(
        "--client-profiles",
        default=None,
        help="comma-separated device profile per client (cycled); clients only train stages that fit",
    )
    p.add_argument(
        "--data-split",
        choices=["dirichlet", "by_profile"],
        default="dirichlet",
        help="by_profile: each profile's clients hold task families the others lack",
    )
    p.add_argument("--stop-after", type=int, default=None, help="end after this stage's transfer (screening)")
    p.add_argument(
        "--full-eval",
        choices=["stage", "round", "off"],
        default="stage",
        help="evaluate the full model with the transferred LoRA after each stage (default), round, or never",
    )
    p.add_argument("--data", default=None, help="JSONL instruction data (default: synthetic multi-task)")
    p.add_argument("--examples-per-client", type=int, default=48, help="synthetic training examples per client")
    p.add_argument("--data-alpha", type=float, default=0.5, help="Dirichlet alpha over tasks (non-IID); 0 = IID")
    p.add_argument("--eval-examples", type=int, default=d["eval_examples"], help="held-out eval examples")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every this many rounds")
    p.add_argument("--export-merged", action="store_true", help="also save the merged model")
    p.add_argument(
        "--adaptive-patience",
        type=int,
        default=0,
        help="adaptive schedule: leave a stage after this many evals without improvement (0 = fixed rounds)",
    )
    p.add_argument(
        "--adaptive-min-delta", type=float, default=DEFAULT_MIN_DELTA, help="eval-loss decrease that counts as progress"
    )
    p.add_argument(
        "--round-split",
        choices=["equal", "depth"],
        default=None,
        help="rounds per stage: in proportion to stage depth (default), or equal (the paper)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data, sampling, init and training")
    p.add_argument("--out", type=Path, default=d["out"], help="output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


_RECIPE_OPTIONS = ("similarity", "grouping", "fusion", "beta", "transfer", "keep_ends")
"""The stage-recipe options (``StageRecipe`` fields) that ``simulate`` and ``pack`` both take."""


def _recipe_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _RECIPE_OPTIONS}


def _run_simulation(args: argparse.Namespace) -> int:
    from devft_edge.lora import LoraSettings
    from devft_edge.presets import method_settings
    from devft_edge.simulator import SimulationConfig, simulate
    from devft_edge.training import TrainSettings

    method = method_settings(
        args.preset,
        **_recipe_options(args),
        heal=args.heal,
        heal_steps=args.heal_steps,
        heal_rank=args.heal_rank,
        round_split=args.round_split,
        stage_steps=args.stage_steps,
        capacities=args.capacities,
    )
    cfg = SimulationConfig(
        model=args.model,
        method=args.method,
        clients=args.clients,
        per_round=args.per_round,
        stages=args.stages,
        rounds=args.rounds,
        train=TrainSettings(steps=args.local_steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr),
        lora=LoraSettings(
            rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")) if args.targets else None
        ),
        recipe=method.recipe,
        seed=args.seed,
        data=args.data,
        examples_per_client=args.examples_per_client,
        data_alpha=args.data_alpha or None,
        eval_examples=args.eval_examples,
        eval_every=args.eval_every,
        export_merged=args.export_merged,
        adaptive_patience=args.adaptive_patience,
        adaptive_min_delta=args.adaptive_min_delta,
        round_split=method.round_split,
        capacities=method.capacities,
        stage_steps=method.stage_steps,
        quant=args.quant,
        delivery=args.delivery,
        full_eval=args.full_eval,
        exact_match=args.exact_match,
        client_profiles=tuple(args.client_profiles.split(",")) if args.client_profiles else None,
        data_split=args.data_split,
        stop_after=args.stop_after,
    )
    summary = simulate(cfg, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['method']}: eval loss {summary['initial_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f}, "
            f"exact match {summary['initial_eval_accuracy']:.1%} -> {summary['final_eval_accuracy']:.1%}, "
            f"{summary['wall_seconds']:.0f} s, up {int(summary['bytes_up']) / 1e6:.1f} MB, "
            f"down {int(summary['bytes_down']) / 1e6:.1f} MB\n"
            f"metrics: {args.out / 'metrics.jsonl'}  plot: {args.out / 'curves.png'}  adapter: {summary['adapter_dir']}"
        )
    return 0


SIMULATE_DEFAULTS: dict[str, object] = dict(
    model="tiny",
    method="devft",
    clients=10,
    per_round=3,
    stages=4,
    rounds=12,
    local_steps=10,
    batch=4,
    seq=64,
    lr=3e-4,
    eval_examples=48,
    out=Path("runs/simulate"),
)


def _add_demo_options(p: argparse.ArgumentParser) -> None:
    from devft_edge.demo import DemoConfig
    from devft_edge.methods import METHODS

    d = DemoConfig()
    p.add_argument("--model", default=d.model, help="smollm2 | tiny[-family] | PATH")
    p.add_argument("--method", choices=METHODS, default=d.method, help="federated method the fleet runs")
    p.add_argument("--devices", type=int, default=d.devices, help="device agents to start")
    p.add_argument("--per-round", type=int, default=d.per_round, help="devices selected per round K")
    p.add_argument("--stages", type=int, default=d.stages, help="DevFT stages S")
    p.add_argument("--rounds", type=int, default=d.rounds, help="total round budget, split over stages")
    p.add_argument("--round-split", choices=["depth", "equal"], default=d.round_split, help="rounds per stage")
    p.add_argument("--local-steps", type=int, default=d.local_steps, help="optimizer steps per device round")
    p.add_argument("--batch", type=int, default=d.batch, help="examples per step")
    p.add_argument("--seq", type=int, default=d.seq, help="tokens per example")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on the devices")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--quant", choices=QUANTIZATIONS, default=d.quant, help="pack base-weight storage")
    p.add_argument("--examples-per-client", type=int, default=d.examples_per_client, help="private examples per device")
    p.add_argument("--data-alpha", type=float, default=d.data_alpha, help="Dirichlet alpha over tasks; 0 = IID")
    p.add_argument(
        "--eval-examples", type=int, default=d.eval_examples, help="held-out examples the aggregator evaluates"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed for data, selection, init and training")
    p.add_argument(
        "--profile",
        action="append",
        default=None,
        help=f"device profile, repeatable, cycled (default: {', '.join(d.profiles)})",
    )
    p.add_argument("--transfer", choices=["copy", "inv_n"], default=d.transfer, help="knowledge transfer rule")
    p.add_argument("--keep-ends", type=int, default=d.keep_ends, help="keep the first and last k layers unfused")
    p.add_argument("--beta", type=_beta, default=d.beta, help="DBLF beta in (0, 1] or 'auto'")
    p.add_argument("--stage-steps", choices=["fixed", "compute"], default=d.stage_steps, help="local steps per stage")
    p.add_argument(
        "--adaptive-patience", type=int, default=d.adaptive_patience, help="leave a stage after this many stale evals"
    )
    p.add_argument(
        "--adaptive-min-delta", type=float, default=d.adaptive_min_delta, help="eval-loss decrease that is progress"
    )
    p.add_argument("--heal", choices=["off", "bake", "adapter"], default=d.heal, help="heal fused submodels")
    p.add_argument("--heal-steps", type=int, default=d.heal_steps, help="distillation steps per stage submodel")
    p.add_argument("--heal-prompts", type=int, default=d.heal_prompts, help="server-text sequences to heal on")
    _add_delivery_option(p, d.delivery)
    p.add_argument(
        "--broker", default=None, help="mqtt://host:port of a running broker (default: start the embedded one)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _run_demo(args: argparse.Namespace) -> int:
    from devft_edge.demo import DemoConfig, render_summary, run_demo
    from devft_edge.methods import uses_devft

    cfg = DemoConfig(
        model=args.model,
        method=args.method,
        devices=args.devices,
        per_round=args.per_round,
        stages=args.stages if uses_devft(args.method) else 1,
        rounds=args.rounds,
        round_split=args.round_split,
        local_steps=args.local_steps,
        batch=args.batch,
        seq=args.seq,
        checkpointing=args.checkpointing,
        lr=args.lr,
        rank=args.rank,
        quant=args.quant,
        examples_per_client=args.examples_per_client,
        data_alpha=args.data_alpha or None,
        eval_examples=args.eval_examples,
        seed=args.seed,
        broker=args.broker,
        transfer=args.transfer,
        keep_ends=args.keep_ends,
        beta=args.beta,
        stage_steps=args.stage_steps,
        adaptive_patience=args.adaptive_patience,
        adaptive_min_delta=args.adaptive_min_delta,
        heal=args.heal,
        heal_steps=args.heal_steps,
        heal_prompts=args.heal_prompts,
        delivery=args.delivery,
        **({"profiles": tuple(args.profile)} if args.profile else {}),
    )
    summary = run_demo(cfg, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render_summary(summary))
        print(
            f"metrics: {args.out / 'metrics.jsonl'}  plot: {args.out / 'curves.png'}  adapter: {summary['adapter_dir']}"
            f"  logs: {args.out / 'logs'}"
        )
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from devft_edge.memcheck import measure_stages
    from devft_edge.memory import model_shape
    from devft_edge.models import load_config, tokenizer_bytes
    from devft_edge.planner import PlanSettings, plan, render, with_measurements
    from devft_edge.profiles import load_profiles
    from devft_edge.quantization import QuantSpec

    settings = PlanSettings(
        stages=args.stages,
        rank=args.rank,
        batch=args.batch,
        seq=args.seq,
        quant=args.quant,
        quant_embeddings=not args.fp32_embeddings,
        checkpointing=args.checkpointing,
        tokenizer_bytes=tokenizer_bytes(args.model),
        rounds=args.rounds,
        round_split=args.round_split,
    )
    profiles = load_profiles(args.profile, args.profiles_dir)
    shape = model_shape(load_config(args.model))
    result = plan(shape, args.model, profiles, settings)
    if args.check:
        quant = QuantSpec(args.quant, embeddings=not args.fp32_embeddings)
        layers = [s.layers for s in result.stages]
        measured = measure_stages(args.model, layers, quant, args.batch, args.seq, args.rank, args.checkpointing)
        result = with_measurements(result, shape, [m.train_peak_bytes for m in measured])
    print(json.dumps(result.to_json(), indent=2) if args.json else render(result))
    return 0


def _run_profile(args: argparse.Namespace) -> int:
    from devft_edge.device_probe import measure_profile
    from devft_edge.profiles import dump_profile

    profile = measure_profile(args.name, probe_seconds=args.probe_seconds, step_model=args.measure_step)
    text = dump_profile(profile)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# {args.name}: written by devft-edge profile\n{text}")
        print(
            f"wrote {args.out} (usable budget {profile.budget_bytes / 2**30:.2f} GiB, "
            f"{profile.compute.sustained_gflops} GFLOP/s {profile.compute.backend})"
        )
    else:
        print(text, end="")
    return 0


def _created(text: str | None) -> str:
    """Pack creation time: ``--created``, else ``SOURCE_DATE_EPOCH`` (reproducible builds), else now."""
    import os
    import time

    if text:
        return text
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    stamp = int(epoch) if epoch and epoch.isdigit() else int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _run_keygen(args: argparse.Namespace) -> int:
    from devft_edge.signing import fingerprint, generate_keypair, load_public_key

    private, public = generate_keypair(args.out)
    print(
        f"wrote {private} (keep it on the aggregator) and {public} (provision it to devices); "
        f"key id {fingerprint(load_public_key(public))}"
    )
    return 0


def _run_enroll(args: argparse.Namespace) -> int:
    from devft_edge.identity import describe, enroll

    for device in args.device_id:
        private, enrolled = enroll(device, args.device_keys)
        print(
            f"{device}: enrolled {describe(enrolled)}; its private key {private} goes to the device (agent `identity`)"
        )
    return 0


def _run_broker_config(args: argparse.Namespace) -> int:
    from devft_edge.broker_config import BrokerSpec, read_device_ids, write_broker_config

    devices = read_device_ids(args.devices_file) if args.devices_file else [d for d in args.devices.split(",") if d]
    spec = BrokerSpec(
        fleet=args.fleet,
        devices=tuple(devices),
        tls=args.tls,
        port=args.port,
        hosts=tuple(args.host or ["127.0.0.1"]),
        bind=args.bind,
        plain_port=args.plain_port,
        client_certs=not args.no_client_certs,
        persistence_dir=args.persistence_dir,
        run_as=args.run_as,
    )
    files = write_broker_config(spec, args.out)
    out = args.out
    listeners = f"{'mqtts' if spec.tls else 'mqtt'} on {spec.bind or '*'}:{spec.listen_port}"
    if spec.tls:
        listeners += " (client certificate " + ("required)" if spec.client_certs else "not required)")
    if spec.plain_port is not None:
        listeners += f", mqtt on 127.0.0.1:{spec.plain_port}"
    per_identity = "password, broker.yaml" + (", ca.pem" if spec.tls else "")
    per_identity += ", client.pem, client.key" if spec.tls and spec.client_certs else ""
    users = [i for i in files.identities if i.role == "device"]
    print(
        f"wrote a mosquitto config for fleet {spec.fleet} to {out}: run mosquitto -c {files.conf}\n"
        f"  listeners: {listeners}; anonymous clients refused\n"
        f"  users: {files.identities[0].username} (aggregator), {files.identities[1].username} (status, read-only), "
        f"{len(users)} devices ({', '.join(i.username for i in users[:5])}{', ...' if len(users) > 5 else ''})\n"
        f"  per user, in {out}/aggregator/, {out}/monitor/ and {out}/devices/<id>/: {per_identity}\n"
        f"  secret files are mode 0600; the broker needs to read passwd{', server.key' if spec.tls else ''}"
        f"{'; ca.key signs certificates: keep it offline' if spec.tls else ''}"
    )
    return 0


_BUNDLE_KEYS = (
    "profile",
    "platform",
    "python",
    "backend",
    "data",
    "threads",
    "fleet",
    "broker",
    "public_key",
    "device_key",
    "username",
    "password_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
)
_PATH_KEYS = ("public_key", "device_key", "password_file", "tls_ca", "tls_cert", "tls_key", "identity")


def _bundle_spec(values: dict[str, Any], wheel_sources: list[str], profiles_dirs: list[str]) -> Any:
    from devft_edge.bundle import BundleSpec

    missing = [f"--{k.replace('_', '-')}" for k in ("device_id", "broker", "public_key") if not values.get(k)]
    if not values.get("device_key"):
        missing.append("--device-keys")
    if missing:
        raise DevFTError(f"devft-edge flash needs {', '.join(missing)}")
    fields = {k: values[k] for k in _BUNDLE_KEYS if values.get(k) is not None}
    fields.update({k: Path(v) for k, v in fields.items() if k in _PATH_KEYS})
    return BundleSpec(
        device_id=values["device_id"],
        profiles_dirs=tuple(Path(d) for d in profiles_dirs),
        wheel_sources=tuple(wheel_sources),
        **fields,
    )


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _identity(directory: Path, keys: Sequence[str]) -> dict[str, Any]:
    """A login written by ``broker-config`` (one user's directory): its files, and its username."""
    import yaml

    if not directory.is_dir():
        raise DevFTError(f"--credentials: no {directory} (was the device in broker-config's --devices?)")
    files = {"password_file": "password", "tls_ca": "ca.pem", "tls_cert": "client.pem", "tls_key": "client.key"}
    found: dict[str, Any] = {k: str(directory / f) for k, f in files.items() if (directory / f).is_file()}
    meta = directory / "broker.yaml"
    if meta.is_file():
        found["username"] = yaml.safe_load(meta.read_text()).get("username")
    return {k: v for k, v in found.items() if k in keys and v is not None}


def _with_device_key(entry: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``entry`` with the device's enrolled private key (enrolled now if the device is new; a dry
    run only names where it would be)."""
    from devft_edge.identity import identity
    from devft_edge.signing import PRIVATE_FILE

    device, keys = entry.get("device_id"), args.device_keys
    if not device or keys is None:
        return entry
    key = keys / "private" / device / PRIVATE_FILE if args.dry_run else identity(device, keys)
    return {**entry, "device_key": key}


def _run_flash(args: argparse.Namespace) -> int:
    from devft_edge.bundle import build_bundle
    from devft_edge.flash import (
        FlashJob,
        FlashSettings,
        HealthCheck,
        SshTarget,
        flash,
        load_hosts,
        plan_text,
        render_results,
    )

    given = {k: getattr(args, k) for k in (*_BUNDLE_KEYS, "device_id", "port", "identity") if k != "device_key"}
    login_keys = ("username", "password_file", "tls_ca", "tls_cert", "tls_key")
    if args.bundle_only:
        spec = _bundle_spec(_with_device_key(given, args), args.wheel_source, args.profiles_dir)
        if args.dry_run:
            print(f"would build {args.bundle_only}: {spec.platform}, CPython {spec.python}, backend {spec.backend}")
            return 0
        info = build_bundle(spec, args.bundle_only)
        print(f"wrote {info.path}: version {info.version}, {len(info.wheels)} wheels, {info.size / 1e6:.1f} MB")
        return 0
    if bool(args.host) == bool(args.hosts):
        raise DevFTError("devft-edge flash needs --bundle-only FILE, --host USER@HOST or --hosts FILE")
    entries = load_hosts(args.hosts, given) if args.hosts else [{**given, "host": args.host}]
    if args.credentials:  # a broker-config output: each device's login, the monitor's for the health check
        entries = [
            {**_identity(args.credentials / "devices" / e["device_id"], login_keys), **_given(e)} for e in entries
        ]
    options = tuple(args.ssh_option)
    jobs = [
        FlashJob(
            spec=_bundle_spec(_with_device_key(e, args), args.wheel_source, args.profiles_dir),
            target=SshTarget(
                host=e["host"],
                port=int(e.get("port") or 22),
                identity=Path(e["identity"]) if e.get("identity") else None,
                options=options,
            ),
        )
        for e in entries
    ]
    monitor: dict[str, Any] = {}
    if args.credentials:  # broker-config's read-only user, allowed to read every device's presence
        monitor = {**_identity(args.credentials / "monitor", login_keys), "username": f"monitor-{args.fleet}"}
    if args.health_username or args.health_password_file:
        monitor.update(username=args.health_username, password_file=args.health_password_file)
    if "tls_ca" not in monitor and jobs[0].spec.tls_ca:
        monitor["tls_ca"] = jobs[0].spec.tls_ca
    health = HealthCheck(
        broker=args.health_broker or jobs[0].spec.broker,
        timeout_s=args.health_timeout,
        **{k: Path(v) if k != "username" else v for k, v in monitor.items() if v is not None},
    )
    settings = FlashSettings(health=health, prefix=args.prefix, service=args.service, bundle=args.bundle)
    if args.bundle is not None and len(jobs) > 1:
        raise DevFTError("--bundle holds one device's identity: use it with --host, not --hosts")
    if args.dry_run:
        print(plan_text(jobs, settings))
        return 0
    results = flash(jobs, settings, parallel=args.parallel, progress=lambda d, text: print(f"[{d}] {text}", flush=True))
    print(render_results(results))
    return 0 if all(r.ok for r in results) else 1


def _run_pack(args: argparse.Namespace) -> int:
    if args.pack_command == "inspect":
        return _run_pack_inspect(args)
    if args.pack_command == "verify":
        return _run_pack_verify(args)
    missing = [flag for flag, value in (("--stage", args.stage), ("--out", args.out)) if value is None]
    if missing:
        raise DevFTError(f"devft-edge pack needs {' and '.join(missing)} (or: pack inspect FILE, pack verify FILE)")
    from devft_edge.calibration import calibration_ids
    from devft_edge.layers import num_layers
    from devft_edge.lora import LoraSettings, init_lora_state, lora_shapes
    from devft_edge.models import load_model, load_tokenizer, model_dir
    from devft_edge.pack import write_pack
    from devft_edge.quantization import QuantSpec
    from devft_edge.schedule import StageSchedule
    from devft_edge.signing import load_private_key
    from devft_edge.stage import StageBuilder, StageRecipe
    from devft_edge.training import TrainSettings

    quant = QuantSpec(args.quant, group_size=args.group_size, embeddings=not args.fp32_embeddings)
    lora = LoraSettings(rank=args.rank, alpha=args.alpha)
    training = TrainSettings(steps=args.local_steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr)
    key = load_private_key(args.sign_key) if args.sign_key else None
    recipe = StageRecipe(**_recipe_options(args))
    base = load_model(args.model, seed=args.seed)
    schedule = StageSchedule(num_layers=num_layers(base.config), num_stages=args.stages, total_rounds=args.stages)
    if not 1 <= args.stage <= args.stages:
        raise DevFTError(f"--stage {args.stage} outside 1..{args.stages}")
    tokenizer = load_tokenizer(args.model)
    builder = StageBuilder(base, tokenizer, lora, recipe, calibration_ids(tokenizer), args.model, args.seed)
    full_lora = init_lora_state(lora_shapes(base, lora), lora.rank, args.seed)
    stage = builder.open(args.stage, schedule.capacities[args.stage - 1], full_lora)  # the aggregator's own pipeline
    groups = stage.groups
    manifest = write_pack(
        args.out,
        stage.model,
        stage.start,
        model_name=args.model,
        stage=args.stage,
        stages=args.stages,
        groups=groups,
        lora=lora,
        quant=quant,
        training=training,
        tokenizer_dir=model_dir(args.model),
        created=_created(args.created),
        sign_key=key,
    )
    size = args.out.stat().st_size
    print(
        f"wrote {args.out}: stage {args.stage}/{args.stages}, {len(groups)} layers, {args.quant}, "
        f"{size / 2**20:.1f} MiB ({size / manifest['fp32_bytes']:.3f} of fp32 weights), "
        f"{'signed' if key else 'UNSIGNED'}"
    )
    return 0


def _pack_summary(path: Path, manifest: dict[str, Any], signed: bool) -> dict[str, Any]:
    """What ``pack inspect --json`` prints: the manifest's key facts plus sizes and signature presence."""
    quant = manifest["quant"]
    return {
        "path": str(path),
        **{key: manifest[key] for key in ("format_version", "created", "model", "stage", "stages", "layers", "groups")},
        "quant": quant["scheme"],
        "quant_group_size": quant["group_size"],
        "quant_embeddings": quant["embeddings"],
        "quant_error": quant["error"],
        "bytes": path.stat().st_size,
        "fp32_bytes": manifest["fp32_bytes"],
        **{key: manifest[key] for key in ("members", "lora", "training")},
        "signed": signed,
    }


def _run_pack_inspect(args: argparse.Namespace) -> int:
    from devft_edge.pack import read_manifest

    path = Path(args.file)
    manifest, signed = read_manifest(path)
    info = _pack_summary(path, manifest, signed)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    error = info["quant_error"]
    embeddings = "quantized" if info["quant_embeddings"] else "fp32"
    lines = [
        f"{path}: devft-edge pack, format {info['format_version']}, created {info['created']}",
        f"  model {info['model']}, stage {info['stage']}/{info['stages']}, {info['layers']} layers",
        f"  groups {info['groups']}",
        f"  quantization {info['quant']} (group {info['quant_group_size']}, embeddings {embeddings}): relative RMS "
        f"error mean {error['mean_relative_rms']:.4f}, max {error['max_relative_rms']:.4f} ({error['worst_module']})",
        f"  {info['bytes'] / 2**20:.2f} MiB = {info['bytes'] / info['fp32_bytes']:.3f} of the fp32 weights "
        f"({info['fp32_bytes'] / 2**20:.2f} MiB)",
        f"  signature: {'present (check it with pack verify)' if signed else 'none'}; member hashes verified",
        "  members:",
    ]
    lines += [
        f"    {name:<24} {m['bytes']:>12,} bytes  sha256 {m['sha256'][:16]}..." for name, m in info["members"].items()
    ]
    print("\n".join(lines))
    return 0


def _run_pack_verify(args: argparse.Namespace) -> int:
    import tempfile

    from devft_edge.pack import PackError, read_pack
    from devft_edge.signing import fingerprint, load_public_key

    key = load_public_key(args.public_key)
    with tempfile.TemporaryDirectory(prefix="devft-verify-") as tmp:
        try:
            pack = read_pack(args.file, Path(tmp) / "pack", key)
        except PackError as error:
            print(f"{args.file}: REFUSED ({error.reason.value}): {error}", file=sys.stderr)
            return 1
    print(
        f"{args.file}: OK: signature by key {fingerprint(key)}, format {pack.manifest['format_version']}, "
        f"{len(pack.manifest['members'])} members verified"
    )
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    import contextlib

    from cloud_aggregator.config import AggregatorConfig
    from cloud_aggregator.service import Aggregator
    from devft_edge.broker import EmbeddedBroker

    for name in ("cloud_aggregator", "devft_edge.mqtt"):  # a service's log is its progress display
        logging.getLogger(name).setLevel(logging.INFO)
    cfg = AggregatorConfig.from_file(args.config)
    broker = args.broker or cfg.broker
    with contextlib.ExitStack() as stack:
        if broker is None:
            embedded = EmbeddedBroker(port=args.embedded_port)
            broker = stack.enter_context(embedded)
            print(f"embedded broker on {broker}: start agents with --broker {broker}", flush=True)
        state = Aggregator(cfg, broker).run()
    print(
        f"run {state.run_id}: {'finished' if state.finished else 'stopped'} after {state.rounds_done} rounds, "
        f"stage {state.stage}; up {state.bytes_up / 1e6:.1f} MB, down {state.bytes_down / 1e6:.1f} MB"
    )
    return 0


def _status_login(args: argparse.Namespace) -> BrokerLogin | None:
    """``status``'s login flags as a :class:`~devft_edge.mqtt.BrokerLogin` (None without any)."""
    from pydantic import ValidationError

    from devft_edge.broker_config import monitor_username
    from devft_edge.errors import ConfigError
    from devft_edge.mqtt import BrokerLogin

    fields = dict(
        username=args.username or (monitor_username(args.fleet) if args.password_file else None),
        password_file=args.password_file,
        tls_ca=args.ca,
        tls_cert=args.cert,
        tls_key=args.key,
    )
    if not any(fields.values()):
        return None
    try:
        return BrokerLogin(**fields)
    except ValidationError as error:
        raise ConfigError([f"{'.'.join(map(str, e['loc'])) or 'login'}: {e['msg']}" for e in error.errors()]) from None


def _run_status(args: argparse.Namespace) -> int:
    import queue
    import time

    from devft_edge.mqtt import BrokerAddress, Connection
    from devft_edge.protocol import Kind, ProtocolError, Topics, decode, unseal
    from devft_edge.signing import load_public_key

    topic = Topics(f"devft/{args.fleet}").status
    key = load_public_key(args.public_key) if args.public_key else None
    login = _status_login(args)
    connection = Connection(
        BrokerAddress.parse(args.broker), f"status-{args.fleet}-{id(args)}", [topic], login=login, persistent=False
    )
    connection.start(timeout=args.timeout)
    deadline = time.monotonic() + args.timeout
    data, refused = None, ""
    try:
        while data is None:  # only the status topic's STATUS counts (some brokers also replay others)
            item = connection.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            try:
                message = decode(unseal(item.payload, item.topic, key))
            except ProtocolError as error:
                refused = f" (a message was refused: {error})"
                continue
            if item.topic == topic and message.kind is Kind.STATUS:
                data = message.data
    except queue.Empty:
        raise DevFTError(f"no aggregator status on {topic} within {args.timeout:.0f} s{refused}") from None
    finally:
        connection.stop()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    round_open = data.get("round_open") or {}
    loss = data.get("eval_loss")
    print(
        f"run {data['run']}: stage {data['stage']}/{data['stages']}, round {data['round']}/{data['rounds']}"
        f"{' (finished)' if data.get('finished') else ''}\n"
        f"  devices online: {', '.join(data.get('devices_online', [])) or '-'}"
        f" ({data.get('devices_online_count', 0)} online, {data.get('devices_known', 0)} known)\n"
        f"  open round: {round_open.get('index', '-')}, updates {len(round_open.get('accepted', []))}"
        f"/{len(round_open.get('selected', []))}\n"
        f"  bytes up {data['bytes_up'] / 1e6:.1f} MB, down {data['bytes_down'] / 1e6:.1f} MB; "
        f"last eval loss {'-' if loss is None else f'{loss:.4f}'}"
    )
    return 0


def _run_agent(args: argparse.Namespace) -> int:
    from device_agent.agent import Agent
    from device_agent.config import AgentConfig

    for name in ("device_agent", "devft_edge.mqtt"):  # a service's log is its progress display
        logging.getLogger(name).setLevel(logging.INFO)
    cfg = AgentConfig.from_file(args.config)
    if args.broker:
        cfg = cfg.model_copy(update={"broker": args.broker})
    Agent(cfg).run(max_seconds=args.max_seconds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="devft-edge", description="Developmental federated LoRA tuning for edge devices."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated simulation in one process")
    _add_simulation_options(sim, SIMULATE_DEFAULTS)
    sim.set_defaults(func=_run_simulation)
    demo = sub.add_parser(
        "demo", help="the main job: broker, aggregator and device agents as processes; DevFT on SmolLM2-135M"
    )
    _add_demo_options(demo)
    demo.set_defaults(func=_run_demo)

    pl = sub.add_parser("plan", help="plan each stage's submodel against device memory profiles")
    pl.add_argument("--model", default="smollm2", help="smollm2 | tiny[-family] | PATH")
    pl.add_argument("--profile", action="append", required=True, help="profile name or YAML path (repeatable)")
    pl.add_argument("--profiles-dir", action="append", default=[], help="extra directory of profile YAML files")
    pl.add_argument("--stages", type=int, default=4, help="DevFT stages S")
    pl.add_argument("--rank", type=int, default=8, help="LoRA rank")
    pl.add_argument("--batch", type=int, default=4, help="examples per local step")
    pl.add_argument("--seq", type=int, default=64, help="tokens per example")
    pl.add_argument("--quant", choices=QUANTIZATIONS, default="none", help="pack base weights")
    pl.add_argument("--fp32-embeddings", action="store_true", help="keep embedding/head fp32 in quantized packs")
    pl.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on the devices")
    pl.add_argument("--rounds", type=int, default=12, help="round budget (for the cost predicted against FedIT)")
    pl.add_argument("--round-split", choices=["depth", "equal"], default="depth", help="rounds per stage")
    pl.add_argument("--check", action="store_true", help="measure one training step per stage on this machine")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_run_plan)

    kg = sub.add_parser("keygen", help="write an ed25519 key pair for signing packs")
    kg.add_argument("--out", type=Path, required=True, help="directory for private.pem and public.pem")
    kg.set_defaults(func=_run_keygen)

    en = sub.add_parser("enroll", help="give devices an ed25519 identity and enrol it with the fleet")
    en.add_argument("--device-id", action="append", required=True, help="device id (repeat for several)")
    en.add_argument(
        "--device-keys", type=Path, required=True, help="the aggregator's device_keys directory (<id>.pem per device)"
    )
    en.set_defaults(func=_run_enroll)

    bc = sub.add_parser("broker-config", help="write a mosquitto config with TLS, per-device passwords and an ACL")
    bc.add_argument("--fleet", default="default", help="fleet name (topic prefix devft/<fleet>)")
    devices = bc.add_mutually_exclusive_group(required=True)
    devices.add_argument("--devices", help="comma-separated device ids")
    devices.add_argument("--devices-file", type=Path, help="file of device ids, one per line (# comments)")
    bc.add_argument("--out", type=Path, required=True, help="directory to write (must be empty or absent)")
    bc.add_argument("--tls", action="store_true", help="TLS listener with a new CA and server certificate")
    bc.add_argument("--no-client-certs", action="store_true", help="with --tls: passwords only, no client certs")
    bc.add_argument("--port", type=int, default=None, help="listener port (default: 8883 with --tls, else 1883)")
    bc.add_argument(
        "--host", action="append", default=None, help="broker name or IP clients use, repeatable (default: 127.0.0.1)"
    )
    bc.add_argument("--bind", default=None, help="address the listener binds to (default: every interface)")
    bc.add_argument("--plain-port", type=int, default=None, help="with --tls: plain MQTT on 127.0.0.1 on this port")
    bc.add_argument("--persistence-dir", type=Path, default=None, help="keep sessions across restarts here")
    bc.add_argument("--run-as", default=None, help="user a broker started as root switches to (mosquitto 'user')")
    bc.set_defaults(func=_run_broker_config)

    fl = sub.add_parser("flash", help="build an agent bundle, install it on devices over SSH, health-check")
    where = fl.add_mutually_exclusive_group()
    where.add_argument("--bundle-only", type=Path, metavar="OUT.tar.gz", help="only build the bundle")
    where.add_argument("--host", help="USER@HOST of the device to flash")
    where.add_argument("--hosts", type=Path, help="YAML list of devices (host, device_id, any option below)")
    fl.add_argument("--device-id", help="the device's id (its MQTT client id and username)")
    fl.add_argument("--profile", default="measure", help="device profile name or YAML, or 'measure'")
    fl.add_argument("--profiles-dir", action="append", default=[], help="extra directory of profile YAML files")
    fl.add_argument("--broker", help="mqtt[s]://host:port the agent connects to")
    fl.add_argument("--fleet", default="default", help="fleet name (topic prefix devft/<fleet>)")
    fl.add_argument("--public-key", help="the aggregator's public key (PEM)")
    fl.add_argument(
        "--device-keys",
        type=Path,
        default=None,
        help="the aggregator's device_keys directory: each device is enrolled there (a new one gets a key pair)",
    )
    fl.add_argument("--platform", choices=["linux_aarch64", "linux_x86_64"], default="linux_aarch64")
    fl.add_argument("--python", default="3.11", help="the device's Python version")
    fl.add_argument("--backend", choices=["torch", "ort"], default="torch", help="trainer backend")
    fl.add_argument(
        "--data", default="synthetic:48:0", help="local data on the device (JSONL path) or synthetic:N:SEED"
    )
    fl.add_argument("--threads", type=int, default=None, help="torch threads on the device (default: all cores)")
    fl.add_argument("--username", default=None, help="MQTT username (default with a password file: the device id)")
    fl.add_argument("--password-file", default=None, help="file holding the device's MQTT password")
    fl.add_argument("--tls-ca", default=None, help="CA certificate of an mqtts:// broker")
    fl.add_argument("--tls-cert", default=None, help="the device's client certificate")
    fl.add_argument("--tls-key", default=None, help="the device's client key")
    fl.add_argument("--wheel-source", action="append", default=[], help="extra pip find-links dir or index URL")
    fl.add_argument("--bundle", type=Path, default=None, help="install this prebuilt bundle instead of building one")
    fl.add_argument("--port", type=int, default=22, help="SSH port")
    fl.add_argument("--identity", default=None, help="SSH private key")
    fl.add_argument("--ssh-option", action="append", default=[], help="extra ssh -o option, repeatable")
    fl.add_argument("--prefix", default="/opt/devft-edge", help="install prefix on the device")
    fl.add_argument("--service", choices=["auto", "systemd", "runner", "none"], default="auto")
    fl.add_argument("--health-timeout", type=float, default=180.0, help="seconds to wait for the agent's hello")
    fl.add_argument("--health-broker", default=None, help="broker to watch for the hello (default: --broker)")
    fl.add_argument("--health-username", default=None, help="your login to that broker (e.g. the aggregator's)")
    fl.add_argument("--health-password-file", type=Path, default=None, help="file with that login's password")
    fl.add_argument(
        "--credentials",
        type=Path,
        default=None,
        help="a broker-config output directory: each device's login, and the monitor's for the health check",
    )
    fl.add_argument("--parallel", type=int, default=4, help="devices flashed at once with --hosts")
    fl.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    fl.set_defaults(func=_run_flash)

    pk = sub.add_parser("pack", help="build a stage pack (or: pack inspect FILE, pack verify FILE)")
    pk.add_argument("--model", default="smollm2", help="smollm2 | tiny[-family] | PATH")
    pk.add_argument("--stage", type=int, default=None, help="stage number, 1-based")
    pk.add_argument("--stages", type=int, default=4, help="DevFT stages S")
    pk.add_argument("--quant", choices=QUANTIZATIONS, default="int4", help="base-weight storage")
    pk.add_argument("--group-size", type=int, default=64, help="int4 group size")
    pk.add_argument("--fp32-embeddings", action="store_true", help="do not quantize the embedding/head")
    pk.add_argument("--rank", type=int, default=8, help="LoRA rank")
    pk.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    pk.add_argument("--similarity", default="cka", help="layer similarity for grouping")
    pk.add_argument("--grouping", default="contiguous", help="grouping variant")
    pk.add_argument("--fusion", default="dblf", help="fusion variant")
    pk.add_argument("--beta", type=_beta, default=0.1, help="DBLF beta")
    pk.add_argument("--transfer", choices=["copy", "inv_n"], default="copy", help="knowledge-transfer rule")
    pk.add_argument("--keep-ends", type=int, default=0, help="keep the first and last k layers unfused")
    pk.add_argument("--local-steps", type=int, default=8, help="training default: steps per round")
    pk.add_argument("--batch", type=int, default=4, help="training default: batch")
    pk.add_argument("--seq", type=int, default=64, help="training default: tokens per example")
    pk.add_argument("--lr", type=float, default=3e-4, help="training default: learning rate")
    pk.add_argument("--seed", type=int, default=0, help="seed of the initial LoRA and grouping")
    pk.add_argument("--sign-key", type=Path, default=None, help="ed25519 private key PEM (devft-edge keygen)")
    pk.add_argument("--created", default=None, help="creation time (default: $SOURCE_DATE_EPOCH or now)")
    pk.add_argument("--out", type=Path, default=None, help="pack file to write")
    pk_sub = pk.add_subparsers(dest="pack_command", required=False)
    ins = pk_sub.add_parser("inspect", help="print a pack's manifest, sizes and quantization error")
    ins.add_argument("file", help="pack file")
    ins.add_argument("--json", action="store_true", help="machine-readable")
    ver = pk_sub.add_parser("verify", help="verify signature, format and every member hash (exit 0 only if all pass)")
    ver.add_argument("file", help="pack file")
    ver.add_argument("--public-key", type=Path, required=True, help="the aggregator's public.pem")
    pk.set_defaults(func=_run_pack)

    sv = sub.add_parser("serve", help="run the cloud aggregator service")
    sv.add_argument("--config", type=Path, required=True, help="aggregator YAML config")
    sv.add_argument("--broker", default=None, help="mqtt://host:port (default: the config's, else embedded)")
    sv.add_argument("--embedded-port", type=int, default=None, help="port of the embedded broker (default: free)")
    sv.set_defaults(func=_run_serve)

    st = sub.add_parser("status", help="show a run's progress from the aggregator's retained status")
    st.add_argument("--broker", required=True, help="mqtt[s]://host:port")
    st.add_argument("--username", default=None, help="MQTT username (default with --password-file: monitor-<fleet>)")
    st.add_argument("--password-file", type=Path, default=None, help="file whose first line is the password")
    st.add_argument("--ca", type=Path, default=None, help="CA certificate (PEM) of an mqtts:// broker")
    st.add_argument("--cert", type=Path, default=None, help="client certificate (PEM), if the broker requires one")
    st.add_argument("--key", type=Path, default=None, help="private key (PEM) of --cert")
    st.add_argument("--fleet", default="default", help="fleet name (topic prefix devft/<fleet>)")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the status")
    st.add_argument(
        "--public-key",
        type=Path,
        default=None,
        help="the aggregator's public key: show the status only if it signed it",
    )
    st.add_argument("--json", action="store_true", help="print the status document")
    st.set_defaults(func=_run_status)

    ag = sub.add_parser("agent", help="run the on-device training agent")
    ag.add_argument("--config", type=Path, required=True, help="agent YAML config")
    ag.add_argument("--broker", default=None, help="mqtt://host:port (overrides the config)")
    ag.add_argument("--max-seconds", type=float, default=None, help="stop after this long (default: run until killed)")
    ag.set_defaults(func=_run_agent)

    pr = sub.add_parser("profile", help="measure this machine and write a device profile YAML")
    pr.add_argument("--name", default="this-device", help="profile name (the YAML file stem)")
    pr.add_argument("--out", type=Path, default=None, help="YAML file to write (default: print)")
    pr.add_argument("--probe-seconds", type=float, default=2.0, help="length of the matmul throughput probe")
    pr.add_argument(
        "--measure-step",
        metavar="MODEL",
        default=None,
        help="also measure a real training step of MODEL's first stage (e.g. smollm2); plan uses it for step time",
    )
    pr.set_defaults(func=_run_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``devft-edge`` console script."""
    # bitsandbytes (imported by peft when installed, already while the parser is built) warns that
    # its optional hub-downloaded CPU kernel is missing; we never download at run time and its
    # built-in CPU path is what we use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    try:
        return int(args.func(args))
    except DevFTError as exc:
        print(f"devft-edge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
