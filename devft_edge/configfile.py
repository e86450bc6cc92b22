"""Loading a YAML config file into a pydantic model, with errors that name the file and field.

The aggregator's and the agent's configs (and any future service config) share this, so every
config error reads the same: ``aggregator.yaml: train.steps: Input should be greater than or
equal to 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from devft_edge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def load_yaml_model(cls: type[M], path: str | Path) -> M:
    """Read ``path`` and validate it as ``cls``; every problem is listed in one :class:`ConfigError`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read config: {error}") from None
    try:
        return cls.model_validate(data or {})
    except ValidationError as error:
        raise ConfigError(
            [f"{path}: {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in error.errors()]
        ) from None
