"""Flow parameters as forms: pydantic models whose every field carries a description, so the Prefect UI renders a
form a person can fill in without reading code (enums as drop-downs, defaults shown).

No union of models anywhere: the Prefect UI mishandles them (PrefectHQ/prefect#18445). A run is described by
an existing spec file *or* by the task form; `resolve_spec` turns either (plus the run's overrides) into one
spec file that the flow then routes as the CLI does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from visionroute.spec import Domain, SpecError, Task, TaskSpec, load_spec, parse_spec


class _Form(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskForm(_Form):
    """A new task, filled in from the run form (leave `name` empty to route the spec file given instead)."""

    name: str = Field(
        "",
        pattern=r"^$|^[a-z0-9-]+$",
        max_length=64,
        description="Task name (lowercase letters, digits, dashes): names the MLflow experiment and the registered "
        "model. Leave empty when a spec file is given above.",
    )
    task: Task = Field(
        Task.classify,
        description="classify: your own classes; tag, ocr, detect_objects, detect_faces: what off-the-shelf "
        "Vision APIs do.",
    )
    classes: list[str] = Field(
        default_factory=list,
        description="classify only: the class names (Add item for each). None: read from the data folder's sub-folders.",
    )
    data_path: str = Field(
        "",
        description="Labelled images on the worker's disk: class sub-folders (optionally under train/ val/ test/), "
        "a CSV manifest or a MedMNIST .npz. Relative to the repository root, e.g. examples/data/ants_bees.",
    )
    labeled_examples: Annotated[int, Field(ge=0)] = Field(
        0,
        description="Labelled images available when there is no data folder yet (0: count them in the data folder).",
    )
    domain: Domain = Field(
        Domain.natural,
        description="What the images look like; auto measures how far they are from ImageNet photos.",
    )
    external_api_allowed: bool = Field(
        True, description="Off: images must not leave the premises (no cloud Vision API)."
    )
    monthly_volume: Annotated[int, Field(ge=0)] = Field(
        0, description="Images per month the task will see in production (drives the cost comparison)."
    )
    proven_need: bool = Field(
        False,
        description="On: a custom model is proven necessary at production scale (allows scratch training).",
    )
    route: Literal["auto", "vision_api", "finetune", "scratch"] = Field(
        "auto",
        description="auto: the framework decides; anything else forces that route (the decision says why not).",
    )
    model: str = Field(
        "auto",
        description="A catalogue model (tf_efficientnet_lite0, resnet18, ...) or auto (from data and budget).",
    )
    budget_minutes: Annotated[float, Field(gt=0, le=7 * 24 * 60)] = Field(
        20, description="Wall-clock minutes the training may take."
    )
    epochs: Annotated[int, Field(ge=0, le=1000)] = Field(
        0, description="Upper bound on training epochs (0: the route's default)."
    )
    seed: int = Field(0, description="Random seed for the split and the training.")

    def is_blank(self) -> bool:
        return not self.name

    def to_spec(self, base_dir: Path) -> TaskSpec:
        """The strict task spec this form describes; errors name the form's field."""
        raw: dict = {
            "name": self.name,
            "task": self.task.value,
            "domain": self.domain.value,
            "constraints": {
                "external_api_allowed": self.external_api_allowed,
                "monthly_volume": self.monthly_volume,
                "proven_need": self.proven_need,
            },
            "route": self.route,
            "training": {"model": self.model, "budget_minutes": self.budget_minutes, "seed": self.seed},
        }
        if self.classes:
            raw["classes"] = list(self.classes)
        if self.epochs:
            raw["training"]["epochs"] = self.epochs
        if self.data_path or self.labeled_examples:
            raw["data"] = {"path": self.data_path or None, "labeled_examples": self.labeled_examples or None}
        return parse_spec(raw, source="task form", base_dir=base_dir)


class RunOverrides(_Form):
    """Changes for this run only, on top of the spec file or the task form."""

    route: Literal["as in the spec", "auto", "vision_api", "finetune", "scratch"] = Field(
        "as in the spec", description="Force a route for this run, or keep the spec's."
    )
    # Plain numbers with 0 for "keep the spec's": an optional number renders as a str/None toggle in the UI.
    budget_minutes: Annotated[float, Field(ge=0, le=7 * 24 * 60)] = Field(
        0, description="Training budget in minutes for this run (0: the spec's), e.g. 1 for a quick check."
    )
    epochs: Annotated[int, Field(ge=0, le=1000)] = Field(
        0, description="Upper bound on training epochs for this run (0: the spec's)."
    )
    processes: Annotated[int, Field(ge=0, le=4096)] = Field(
        0,
        description="Training processes for this run, one per GPU (torchrun DDP); 0: the spec's, by default "
        "one per visible GPU for the scratch route.",
    )

    def is_empty(self) -> bool:
        return self == RunOverrides()

    def apply(self, spec: TaskSpec) -> TaskSpec:
        training: dict = {}
        if self.budget_minutes:
            training["budget_minutes"] = self.budget_minutes
        if self.epochs:
            training["epochs"] = self.epochs
        if self.processes:
            training["processes"] = self.processes
        update: dict = {"training": spec.training.model_copy(update=training)} if training else {}
        if self.route != "as in the spec":
            update["route"] = self.route
        # Through validation again, so an override obeys the same rules as the spec itself.
        return TaskSpec.model_validate({**spec.model_dump(), **update})


def resolve_spec(spec_path: str, form: TaskForm, overrides: RunOverrides, folder: Path, cwd: Path) -> Path:
    """The spec file to route: `spec_path` as it is, or the form and/or the overrides written as a spec file
    in `folder` (logged with the run like any spec). Relative paths resolve against `cwd` (the worker's
    working directory: the repository root)."""
    if spec_path and not form.is_blank():
        raise SpecError(
            "give either spec_path (an existing spec file) or the task form (task.name ...), not both; "
            "clear one of them"
        )
    if not spec_path and form.is_blank():
        raise SpecError(
            "nothing to route: set spec_path to a task spec file (e.g. examples/tasks/ants-vs-bees.yaml) "
            "or fill in the task form, starting with task.name"
        )
    if spec_path:
        path = Path(spec_path) if Path(spec_path).is_absolute() else cwd / spec_path
        if overrides.is_empty():
            return path.resolve()
        spec = load_spec(path)
    else:
        spec = form.to_spec(cwd)
    spec = overrides.apply(spec)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{spec.name}-{spec.digest()}.yaml"
    out.write_text(
        "# Written by the route-image-task flow from "
        + ("the task form" if not spec_path else f"{spec_path} with this run's overrides")
        + "\n"
        + yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    )
    return out
