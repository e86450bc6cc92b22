"""``pack``, ``pack inspect`` and ``pack verify``: build, read and check stage packs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devft_edge.errors import DevFTError

if TYPE_CHECKING:
    from devft_edge.cli.options import Subparsers
    from devft_edge.pack_manifest import PackManifest


def _created(text: str | None) -> str:
    """Pack creation time: ``--created``, else ``SOURCE_DATE_EPOCH`` (reproducible builds), else now."""
    import os
    import time

    if text:
        return text
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    stamp = int(epoch) if epoch and epoch.isdigit() else int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _run_pack(args: argparse.Namespace) -> int:
    if args.pack_command == "inspect":
        return _run_pack_inspect(args)
    if args.pack_command == "verify":
        return _run_pack_verify(args)
    missing = [flag for flag, value in (("--stage", args.stage), ("--out", args.out)) if value is None]
    if missing:
        raise DevFTError(f"devft-edge pack needs {' and '.join(missing)} (or: pack inspect FILE, pack verify FILE)")
    from devft_edge.calibration import calibration_ids
    from devft_edge.cli.config_options import config_data
    from devft_edge.layers import num_layers
    from devft_edge.lora import init_lora_state, lora_shapes
    from devft_edge.models import load_model, load_tokenizer, model_dir
    from devft_edge.pack import write_pack
    from devft_edge.quantization import QuantSpec
    from devft_edge.run_config import RunConfig
    from devft_edge.signing import load_private_key
    from devft_edge.stage import StageBuilder

    data = config_data(args, RunConfig)
    cfg = RunConfig(**data | {"rounds": max(RunConfig().rounds, data.get("stages", 0))})  # rounds: unused here
    stages = cfg.stage_count
    quant = QuantSpec(cfg.quant, group_size=args.group_size, embeddings=not args.fp32_embeddings)
    key = load_private_key(args.sign_key) if args.sign_key else None
    base = load_model(cfg.model, seed=cfg.seed)
    schedule = cfg.schedule(num_layers(base.config))
    if not 1 <= args.stage <= stages:
        raise DevFTError(f"--stage {args.stage} outside 1..{stages}")
    tokenizer = load_tokenizer(cfg.model)
    builder = StageBuilder(base, tokenizer, cfg.lora, cfg.recipe, calibration_ids(tokenizer), cfg.model, cfg.seed)
    full_lora = init_lora_state(lora_shapes(base, cfg.lora), cfg.lora.rank, cfg.seed)
    stage = builder.open(args.stage, schedule.capacities[args.stage - 1], full_lora)  # the aggregator's own pipeline
    groups = stage.groups
    manifest = write_pack(
        args.out,
        stage.model,
        stage.start,
        model_name=cfg.model,
        stage=args.stage,
        stages=stages,
        groups=groups,
        lora=cfg.lora,
        quant=quant,
        training=cfg.train,
        tokenizer_dir=model_dir(cfg.model),
        created=_created(args.created),
        sign_key=key,
    )
    size = args.out.stat().st_size
    print(
        f"wrote {args.out}: stage {args.stage}/{stages}, {len(groups)} layers, {cfg.quant}, "
        f"{size / 2**20:.1f} MiB ({size / manifest.fp32_bytes:.3f} of fp32 weights), "
        f"{'signed' if key else 'UNSIGNED'}"
    )
    return 0


def _pack_summary(path: Path, manifest: PackManifest, signed: bool) -> dict[str, Any]:
    """What ``pack inspect --json`` prints: the manifest's key facts plus sizes and signature presence.

    Read from the manifest's own JSON (:meth:`PackManifest.to_json`, nested keys sorted as in the
    canonical manifest), so the keys are written in one place.
    """
    data = json.loads(json.dumps(manifest.to_json(), sort_keys=True))
    quant = data["quant"]
    return {
        "path": str(path),
        **{key: data[key] for key in ("format_version", "created", "model", "stage", "stages", "layers", "groups")},
        "quant": quant["scheme"],
        "quant_group_size": quant["group_size"],
        "quant_embeddings": quant["embeddings"],
        "quant_error": quant["error"],
        "bytes": path.stat().st_size,
        "fp32_bytes": data["fp32_bytes"],
        **{key: data[key] for key in ("members", "lora", "training")},
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
        f"{args.file}: OK: signature by key {fingerprint(key)}, format {pack.manifest.format_version}, "
        f"{len(pack.manifest.members)} members verified"
    )
    return 0


PACK_FIELDS = ("model", "method", "seed", "stages", "capacities", "quant", "train", "lora", "recipe")
"""The run-configuration fields a pack depends on (its ``--`` options are theirs)."""


def add_pack(sub: Subparsers, full: bool = True) -> None:
    """``pack`` and its ``inspect`` and ``verify`` sub-commands (the build options only when ``full``:
    they come from the run configuration, whose import loads torch)."""
    pk = sub.add_parser("pack", help="build a stage pack (or: pack inspect FILE, pack verify FILE)")
    pk.add_argument("--stage", type=int, default=None, help="stage number, 1-based")
    pk.add_argument("--group-size", type=int, default=64, help="int4 group size")
    pk.add_argument("--fp32-embeddings", action="store_true", help="do not quantize the embedding/head")
    pk.add_argument("--sign-key", type=Path, default=None, help="ed25519 private key PEM (devft-edge keygen)")
    pk.add_argument("--created", default=None, help="creation time (default: $SOURCE_DATE_EPOCH or now)")
    pk.add_argument("--out", type=Path, default=None, help="pack file to write")
    if full:
        from devft_edge.cli.config_options import add_config_options
        from devft_edge.run_config import RunConfig

        add_config_options(pk, RunConfig, only=PACK_FIELDS, skip=("recipe.heal",))
    pk_sub = pk.add_subparsers(dest="pack_command", required=False)
    ins = pk_sub.add_parser("inspect", help="print a pack's manifest, sizes and quantization error")
    ins.add_argument("file", help="pack file")
    ins.add_argument("--json", action="store_true", help="machine-readable")
    ver = pk_sub.add_parser("verify", help="verify signature, format and every member hash (exit 0 only if all pass)")
    ver.add_argument("file", help="pack file")
    ver.add_argument("--public-key", type=Path, required=True, help="the aggregator's public.pem")
    pk.set_defaults(func=_run_pack)
