"""The ONNX Runtime trainer backend, run in its own virtualenv (.venv-ort, built by `make test`).

onnxruntime-training must not share an environment with plain onnxruntime, so this test drives a
script in .venv-ort: build a signed int8 pack of the tiny model, train it with the ort backend and
with the torch backend from the same start, and compare the updates' names, shapes and effect.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ORT_PYTHON = Path(__file__).resolve().parent.parent / ".venv-ort" / "bin" / "python"

SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
import torch
from devft_edge.backends import get_trainer
from devft_edge.fusion import FUSIONS
from devft_edge.lora import LoraSettings, init_lora_state, lora_shapes
from devft_edge.models import load_model, model_dir
from devft_edge.pack import read_pack, write_pack
from devft_edge.quantization import QuantSpec
from devft_edge.signing import generate_keypair, load_private_key, load_public_key
from devft_edge.submodel import build_submodel, stage_lora
from devft_edge.tasks import generate_synthetic
from devft_edge.training import TrainSettings

tmp = Path(tempfile.mkdtemp())
private, public = generate_keypair(tmp / "keys")
base = load_model("tiny", seed=0)
groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
lora = LoraSettings(rank=4, alpha=8.0)
fusion = FUSIONS.get("dblf")
full = init_lora_state(lora_shapes(base, lora), lora.rank, 0)
start = stage_lora(full, groups, fusion)
write_pack(tmp / "p.devpack", build_submodel(base, groups, fusion).model, start, model_name="tiny", stage=1, stages=2,
           groups=groups, lora=lora, quant=QuantSpec("int8"), training=TrainSettings(steps=4, batch_size=2, seq_len=48),
           tokenizer_dir=model_dir("tiny"), created="2026-11-22T00:00:00Z", sign_key=load_private_key(private))
pack = read_pack(tmp / "p.devpack", tmp / "unpacked", load_public_key(public))
examples = generate_synthetic(8, seed=1)
settings = TrainSettings(steps=4, batch_size=2, seq_len=48, lr=1e-3)
ort = get_trainer("ort").train(pack, examples, settings, seed=0, start=start)
ref = get_trainer("torch").train(pack, examples, settings, seed=0, start=start)
moved = {k: float((ort.lora[k] - start[k]).norm()) for k in start}
print(json.dumps({
    "names_equal": sorted(ort.lora) == sorted(ref.lora),
    "shapes_equal": all(ort.lora[k].shape == ref.lora[k].shape for k in ref.lora),
    "dtypes": sorted({str(v.dtype) for v in ort.lora.values()}),
    "finite": all(bool(torch.isfinite(v).all()) for v in ort.lora.values()),
    "moved": sum(moved.values()),
    "ort_loss": ort.train_loss, "torch_loss": ref.train_loss, "num_samples": ort.num_samples,
}))
"""


@pytest.mark.skipif(not ORT_PYTHON.exists(), reason="ORT extra not installed here: run `make venv-ort` (CI builds it)")
def test_ort_backend_update_matches_torch_format(tmp_path):
    done = subprocess.run([str(ORT_PYTHON), "-c", SCRIPT], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["names_equal"] and result["shapes_equal"] and result["finite"]
    assert result["dtypes"] == ["torch.float32"] and result["num_samples"] == 8
    assert result["moved"] > 0  # the LoRA was trained, not returned unchanged
    # same start, same data, same steps: the first-step losses agree, so the means stay close
    assert abs(result["ort_loss"] - result["torch_loss"]) < 0.5 * result["torch_loss"]


def test_ort_backend_without_the_extra_says_how_to_get_it():
    code = "import devft_edge.backends as b; b.get_trainer('ort')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    try:
        import onnxruntime.training  # noqa: F401
    except ImportError:
        assert done.returncode != 0 and "make venv-ort" in done.stderr
