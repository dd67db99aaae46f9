"""One small registry, in the spirit of timm's model registry: a decorator fills it, `create` builds by name.

Used for route backends (visionroute.backends) and for Vision API providers (visionroute.vision).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def create(self, name: str, **config) -> T:
        try:
            factory = self._factories[name]
        except KeyError:
            raise ValueError(
                f"no {self.kind} named {name!r}; registered: {', '.join(self.names())}"
            ) from None
        return factory(**config)

    def names(self) -> list[str]:
        return sorted(self._factories)
