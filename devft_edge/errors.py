"""Exception types of devft-edge.

Every error the library raises on purpose derives from :class:`DevFTError`, so a caller (the CLI,
the aggregator, the agent) can tell a reported problem with the input from a bug. Checks collect
every problem they find and raise once, listing all of them.
"""

from __future__ import annotations

from collections.abc import Iterable


class DevFTError(Exception):
    """Base class of the errors devft-edge raises deliberately."""


class ConfigError(DevFTError, ValueError):
    """A configuration or argument is invalid; the message lists every problem found."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class UnknownVariantError(ConfigError, KeyError):
    """A registry was asked for a name it does not know."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return "; ".join(self.problems)


class UnsupportedArchitectureError(DevFTError):
    """The model's architecture has no entry in the layer-access table."""


class DataError(DevFTError, ValueError):
    """Training or evaluation data is malformed (the message names file and line)."""


def raise_if(problems: list[str]) -> None:
    """Raise one :class:`ConfigError` listing ``problems`` if there are any."""
    if problems:
        raise ConfigError(problems)
