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


def config_problems(error: ValidationError) -> list[str]:
    """One line per problem of a failed validation: ``train.steps: local steps must be >= 1``."""
    return [
        f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {str(e['msg']).removeprefix('Value error, ')}"
        for e in error.errors()
    ]


def load_yaml_model(cls: type[M], path: str | Path) -> M:
    """Read ``path`` and validate it as ``cls``; every problem is listed in one :class:`ConfigError`.

    A model that validates in its constructor and raises :class:`ConfigError` itself (the run
    configurations, :class:`devft_edge.run_config.ConfigModel`) is built by calling it, so its
    problems are listed as they are, not wrapped.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read config: {error}") from None
    data = data or {}
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise ConfigError(f"{path}: (top level): must be a mapping of field names to values")
    try:
        return cls(**data)
    except ValidationError as error:
        problems = config_problems(error)
    except ConfigError as error:
        problems = error.problems
    raise ConfigError([f"{path}: {problem}" for problem in problems])
