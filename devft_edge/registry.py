"""A small name -> class registry for the extension points.

Similarity, grouping, fusion and aggregation rules each keep one :class:`Registry`. A variant is a
class with a ``name`` and a ``paper`` reference; ``get(name, **params)`` builds it and raises
:class:`~devft_edge.errors.UnknownVariantError` naming the known variants when the name is unknown.
One class may be registered under several names with different default parameters (an ablation is
a named variant, not a copy). A variant declares which of its parameters a run configuration sets
(``params``, e.g. DBLF's ``beta``), so callers pass a config's values without naming variants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from devft_edge.errors import UnknownVariantError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps variant names to factories for one extension point (``kind``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, tuple[Callable[..., T], dict[str, Any]]] = {}
        self._params: dict[str, tuple[str, ...]] = {}

    def register(self, name: str, params: tuple[str, ...] = (), **defaults: Any) -> Callable[[type[T]], type[T]]:
        """Class decorator: register ``cls`` as ``name``, built with ``defaults`` unless overridden;
        ``params`` are the parameters a run configuration sets (each needs a default here)."""
        if missing := [p for p in params if p not in defaults]:
            raise ValueError(f"{self.kind} {name!r}: declared parameters without a default: {missing}")

        def wrap(cls: type[T]) -> type[T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = (cls, defaults)
            self._params[name] = params
            return cls

        return wrap

    def params(self, name: str) -> dict[str, Any]:
        """The parameters variant ``name`` takes from a run configuration, with their defaults."""
        if name not in self._factories:
            raise UnknownVariantError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return {p: self._factories[name][1][p] for p in self._params[name]}

    def get(self, name: str, **params: Any) -> T:
        """Build the variant called ``name``; ``params`` override its registered defaults."""
        try:
            factory, defaults = self._factories[name]
        except KeyError:
            raise UnknownVariantError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None
        return factory(**{**defaults, **params})

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
