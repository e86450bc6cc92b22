"""A small name -> class registry for the extension points.

Similarity, grouping, fusion and aggregation rules each keep one :class:`Registry`. A variant is a
class with a ``name`` and a ``paper`` reference; ``get(name, **params)`` builds it and raises
:class:`~devft_edge.errors.UnknownVariantError` naming the known variants when the name is unknown.
One class may be registered under several names with different default parameters (an ablation is
a named variant, not a copy).
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

    def register(self, name: str, **defaults: Any) -> Callable[[type[T]], type[T]]:
        """Class decorator: register ``cls`` as ``name``, built with ``defaults`` unless overridden."""

        def wrap(cls: type[T]) -> type[T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._factories[name] = (cls, defaults)
            return cls

        return wrap

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
