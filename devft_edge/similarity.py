"""Layer-to-layer similarity: the graph ``W`` that deconfliction-guided layer grouping cuts.

DGLG (DevFT, Sec. "Deconfliction-guided layer grouping") builds a graph over the ``L`` decoder
layers and groups layers that are alike, so fusing a group loses little. The paper weights the
graph by parameter cosine, ``W_ij = cos(theta_i, theta_j)``. On SmolLM2-135M that cosine is
0.000 +- 0.001 for every pair of distinct layers, so the graph carries no signal; linear CKA of the
layers' output hidden states on a small calibration text (:mod:`devft_edge.calibration`) shows
clear contiguous blocks. Both are variants here (``weights`` paper-literal, ``cka`` the default).

Every variant returns an ``[L, L]`` float64 matrix that is symmetric, has ones on the diagonal and
no negative entries: negative similarities are clipped to 0 before the Laplacian (a choice the
paper leaves open; a negative edge weight would make ``D - W`` indefinite and the cut objective
meaningless). A pair involving a layer whose evidence is all zeros (zero norm) has similarity 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from devft_edge.errors import ConfigError, raise_if
from devft_edge.registry import Registry

__all__ = [
    "SIMILARITIES",
    "LayerEvidence",
    "LinearCKA",
    "Similarity",
    "WeightCosine",
    "collect_layer_outputs",
]

_E = TypeVar("_E")

_CHUNK_ELEMENTS = 1 << 24
"""Float64 elements (128 MiB) a parameter chunk may occupy across all layers at once."""

_GRAM_ELEMENTS = 1 << 26
"""Float64 elements (512 MiB) the stacked ``[L, tokens^2]`` token Gram matrices of CKA may occupy."""


@dataclass(frozen=True)
class LayerEvidence:
    """What the server knows about each decoder layer; a variant uses one of the two fields."""

    params: Sequence[Mapping[str, Tensor]] | None = None
    """``params[i]``: the i-th decoder layer's named parameters (LoRA included where present),
    names relative to the layer so that they match across layers."""
    outputs: Sequence[Tensor] | None = None
    """``outputs[i]``: the i-th layer's output hidden states on the calibration text,
    ``[tokens, hidden]``; the same tokens for every layer."""


class Similarity:
    """Base of the similarity variants: ``compute(evidence)`` gives ``W`` as ``[L, L]`` float64."""

    name: ClassVar[str]
    paper: ClassVar[str]
    needs: ClassVar[Literal["params", "outputs"]]

    def compute(self, evidence: LayerEvidence) -> Tensor:
        """The similarity matrix; symmetric, unit diagonal, entries in ``[0, 1]``."""
        raise NotImplementedError

    def _required(self, value: Sequence[_E] | None) -> Sequence[_E]:
        """``value`` (``evidence.params`` or ``.outputs``), checked to be present and non-empty."""
        if value is None:
            raise ConfigError(f"similarity {self.name!r} needs layer {self.needs}, but evidence.{self.needs} is None")
        if len(value) == 0:
            raise ConfigError(f"similarity {self.name!r} needs layer {self.needs} for at least one layer, got none")
        return value


SIMILARITIES: Registry[Similarity] = Registry("similarity")


def _cosine_from_gram(gram: Tensor) -> Tensor:
    """Turn a Gram matrix of inner products into cosines: symmetric, unit diagonal, clipped at 0.

    ``cos_ij = G_ij / sqrt(G_ii G_jj)``; a zero-norm row gives 0 off the diagonal.
    """
    gram = (gram + gram.T) / 2
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    sim = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    sim = sim.clamp(0.0, 1.0)
    sim.fill_diagonal_(1.0)
    return sim


@SIMILARITIES.register("weights")
class WeightCosine(Similarity):
    """Paper-literal DGLG graph: cosine of the layers' flattened parameters.

    ``W_ij = <theta_i, theta_j> / (||theta_i|| ||theta_j||)`` where ``theta_i`` is the concatenation
    of all of layer ``i``'s parameters sorted by name. The dot product of two concatenations is the
    sum of the per-tensor dot products, so the vectors are never built: for each tensor name the
    ``L`` layers' copies are cast to float64 a chunk at a time (``L x chunk`` at most 128 MiB) and
    ``G += M M^T`` accumulates the Gram matrix.
    """

    name = "weights"
    paper = "DevFT (Wu et al., ICLR 2026), DGLG: W_ij = cos(theta_i, theta_j)"
    needs = "params"

    def compute(self, evidence: LayerEvidence) -> Tensor:
        """``[L, L]`` parameter-cosine matrix; raises if the layers' names or shapes differ."""
        params = self._required(evidence.params)
        names = sorted(params[0])
        problems: list[str] = []
        for i, layer in enumerate(params):
            if sorted(layer) != names:
                problems.append(f"layer {i} has parameter names {sorted(layer)}, layer 0 has {names}")
                continue
            for key in names:
                if layer[key].shape != params[0][key].shape:
                    problems.append(
                        f"layer {i} parameter {key!r} has shape {tuple(layer[key].shape)}, "
                        f"layer 0 has {tuple(params[0][key].shape)}"
                    )
        raise_if(problems)
        n_layers = len(params)
        gram = torch.zeros(n_layers, n_layers, dtype=torch.float64)
        chunk = max(1, _CHUNK_ELEMENTS // n_layers)
        for key in names:
            flats = [layer[key].detach().reshape(-1) for layer in params]
            for start in range(0, flats[0].numel(), chunk):
                block = torch.stack([f[start : start + chunk].to("cpu", torch.float64) for f in flats])
                gram += block @ block.T
        return _cosine_from_gram(gram)


@SIMILARITIES.register("cka")
class LinearCKA(Similarity):
    """Functional similarity: linear CKA of the layers' output hidden states (default).

    With ``X``, ``Y`` the ``[tokens, hidden]`` outputs of two layers, each centred per feature
    (column mean removed), ``CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``
    (Kornblith et al., ICML 2019). It is invariant to orthogonal transforms and isotropic scaling
    of either representation, so it compares what layers compute, not how their weights are laid
    out. Computed in float64. Since ``||Y^T X||_F^2 = <X X^T, Y Y^T>_F``, CKA is the cosine of the
    ``[tokens, tokens]`` Gram matrices: when ``tokens <= hidden`` or the ``L`` Grams fit in 512 MiB
    they are built once and compared in one product (under 2 s for SmolLM2's 30 layers on 800
    tokens); otherwise the ``[hidden, hidden]`` cross-covariances are formed pair by pair (10x
    slower there, but memory ``O(hidden^2)``).
    """

    name = "cka"
    paper = "Kornblith et al., ICML 2019 (linear CKA); DevFT project choice for DGLG"
    needs = "outputs"

    def compute(self, evidence: LayerEvidence) -> Tensor:
        """``[L, L]`` CKA matrix; raises if the outputs are not 2-D or differ in token count."""
        outputs = self._required(evidence.outputs)
        problems = [
            f"layer {i} output has shape {tuple(x.shape)}, expected [tokens, hidden]"
            for i, x in enumerate(outputs)
            if x.dim() != 2
        ]
        raise_if(problems)
        tokens = outputs[0].shape[0]
        problems = [
            f"layer {i} output has {x.shape[0]} tokens, layer 0 has {tokens}"
            for i, x in enumerate(outputs)
            if x.shape[0] != tokens
        ]
        raise_if(problems)
        centred = [self._centre(x) for x in outputs]
        n_layers = len(centred)
        if all(tokens <= x.shape[1] for x in centred) or n_layers * tokens**2 <= _GRAM_ELEMENTS:
            grams = torch.stack([(x @ x.T).reshape(-1) for x in centred])
            return _cosine_from_gram(grams @ grams.T)
        gram = torch.zeros(n_layers, n_layers, dtype=torch.float64)
        for i in range(n_layers):
            for j in range(i, n_layers):
                gram[i, j] = gram[j, i] = (centred[j].T @ centred[i]).pow(2).sum()
        return _cosine_from_gram(gram)

    @staticmethod
    def _centre(x: Tensor) -> Tensor:
        x = x.detach().to("cpu", torch.float64)
        return x - x.mean(dim=0, keepdim=True)


@torch.no_grad()
def collect_layer_outputs(model: nn.Module, input_ids: Tensor, skip_tokens: int = 0) -> list[Tensor]:
    """Run a HF causal LM once and return each decoder layer's output, ``[tokens, hidden]`` float32.

    ``input_ids`` is ``[seq]`` or ``[batch, seq]``; the first ``skip_tokens`` positions of every
    sequence are dropped, then batch and sequence are flattened into tokens. Why skip: the first
    position is an attention sink whose residual stream carries a massive activation (on
    SmolLM2-135M one entry of about 22,500 against at most ~140 for every other token, layers
    11-28); a single such row dominates linear CKA and makes those 18 layers look identical.
    ``skip_tokens=1`` removes it (SmolLM2, calibration text: adjacent-layer CKA 0.90 -> 0.94,
    layers > 5 apart 0.37 -> 0.47; layers 11-28 stop looking identical).
    ``hidden_states[0]`` is the embedding output, so ``hidden_states[1:]`` holds one tensor per
    decoder layer. Note that HF ties the last entry to ``last_hidden_state``, i.e. the deepest
    layer's output is seen after the model's final norm. The model runs in eval mode (its
    previous mode is restored afterwards).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, int) or not 0 <= skip_tokens < input_ids.shape[1]:
        raise ConfigError(f"skip_tokens={skip_tokens!r} must be an int in [0, {input_ids.shape[1]})")
    was_training = model.training
    model.eval()  # dropout would make the evidence random
    try:
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    finally:
        model.train(was_training)
    return [h[:, skip_tokens:].reshape(-1, h.shape[-1]).float() for h in out.hidden_states[1:]]
