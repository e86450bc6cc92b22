"""Knowledge transfer between stages (DevFT, Sec. "knowledge transfer").

After stage s, every original layer j of group g receives the LoRA of g's representative:
``LoRA_j <- LoRA(rep(g))`` (A and B copied). The next stage then regroups the full model and fuses
these states again, so a layer keeps what its group learned even when the next grouping differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from devft_edge.errors import ConfigError
from devft_edge.lora import LoraState, join_layers, split_layers


def transfer_lora(stage_state: Mapping[str, Tensor], groups: Sequence[Sequence[int]]) -> LoraState:
    """Expand a stage submodel's LoRA to the full model: layer ``j`` in group ``g`` <- rep ``g``.

    Args:
        stage_state: canonical LoRA state of the submodel (layer ``g`` = representative of group g).
        groups: the stage's partition of the full model's layers, one list per representative.

    Returns:
        A full-depth canonical state; members of one group get equal (cloned) tensors.
    """
    reps = split_layers(stage_state)
    if sorted(reps) != list(range(len(groups))):
        raise ConfigError(f"stage LoRA has layers {sorted(reps)} but the group map has {len(groups)} groups")
    full = {j: {name: t.clone() for name, t in reps[g].items()} for g, members in enumerate(groups) for j in members}
    return join_layers(full)
