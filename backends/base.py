"""The one interface every route's backend implements, and the registry that finds them by name.

In the spirit of timm's model registry: `@register_backend("name")` on a small factory fills the registry,
`create_backend(name, **config)` builds one, `list_backends()` makes them discoverable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from visionroute.data.dataset import ImageDataset
from visionroute.decision.rules import Decision
from visionroute.registry import Registry
from visionroute.spec import TaskSpec


@dataclass
class BackendContext:
    """Everything a backend needs for one routed task; run ids are passed explicitly (MLflow's active run
    is thread-local, and Prefect may run tasks in other threads)."""

    spec: TaskSpec
    decision: Decision
    dataset: ImageDataset | None
    parent_run_id: str | None
    work_dir: Path
    """Scratch space for this run (checkpoints); kept after the run."""
    on_progress: Callable[[dict], None] | None = None
    """Called as work advances: after each epoch with the epoch record ("epoch", "epochs"), or with
    {"done", "total"} images (Prefect progress artifact)."""
    prices_path: str | None = None
    """The price file the decision used; estimated costs use the same one."""


@dataclass
class BackendResult:
    route: str
    run_id: str | None
    metrics: dict = field(default_factory=dict)
    model_name: str | None = None
    model_version: str | None = None
    promoted: bool = False
    summary: str = ""


class BackendUnavailable(RuntimeError):
    """The route cannot run here yet or with this configuration; the message says why and what to do."""


@runtime_checkable
class Backend(Protocol):
    name: str

    def run(self, context: BackendContext) -> BackendResult: ...


_BACKENDS: Registry[Backend] = Registry("backend")


def register_backend(name: str) -> Callable[[Callable[..., Backend]], Callable[..., Backend]]:
    return _BACKENDS.register(name)


def create_backend(name: str, **config) -> Backend:
    return _BACKENDS.create(name, **config)


def list_backends() -> list[str]:
    return _BACKENDS.names()
