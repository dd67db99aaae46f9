"""The task spec: a small, strict YAML file that says what a team wants done with its images."""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from visionroute.vision.base import BUILTIN_PROVIDERS


class Task(StrEnum):
    classify = "classify"
    tag = "tag"
    ocr = "ocr"
    detect_objects = "detect_objects"
    detect_faces = "detect_faces"


# Generic tasks are what off-the-shelf Vision APIs already do; classify is the team's own label set.
GENERIC_TASKS = frozenset({Task.tag, Task.ocr, Task.detect_objects, Task.detect_faces})


class Domain(StrEnum):
    natural = "natural"
    product = "product"
    document = "document"
    medical = "medical"
    satellite = "satellite"
    industrial = "industrial"
    radar = "radar"
    microscopy = "microscopy"
    volumetric = "volumetric"
    other = "other"
    auto = "auto"
    """Measured from the images: pretrained against random features (visionroute.data.domain)."""


class Route(StrEnum):
    vision_api = "vision_api"
    finetune = "finetune"
    scratch = "scratch"


class _Strict(BaseModel):
    # NaN and infinity pass no range check by design of IEEE floats; refuse them with a message that says so.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataSpec(_Strict):
    path: Path | None = None
    """Class sub-folders (optionally under train/ val/ test/) or a MedMNIST-style .npz; relative to the spec file."""
    labeled_examples: Annotated[int, Field(ge=0)] | None = None
    """Labelled images available; counted from `path` when that is given."""
    leakage: Literal["report", "remove"] = "report"
    """Test images with an exact or near copy in train/val, when the split is given (folders, an .npz's
    official splits, a manifest's split column): `report` keeps the test split as given and reports the
    accuracy without them beside it; `remove` drops them from test. Splits visionroute makes have none."""


class Constraints(_Strict):
    external_api_allowed: bool = True
    """False: images must not leave the premises (privacy)."""
    monthly_volume: Annotated[int, Field(ge=0)] = 0
    """Images per month the task will see in production."""
    proven_need: bool = False
    """A custom model is proven necessary at production scale."""


class TrainingSpec(_Strict):
    model: str = "auto"
    """A timm model name from the catalogue, or auto (chosen from data size and budget)."""
    budget_minutes: Annotated[float, Field(gt=0, le=7 * 24 * 60)] = 20
    """Wall-clock budget the training respects."""
    epochs: Annotated[int, Field(ge=1, le=1000)] | None = None
    """Upper bound on fine-tuning epochs; default depends on the route."""
    checkpoint: Path | None = None
    """Explicit pretrained weights (a .pth/.pt state dict or a models:/ URI); relative to the spec file."""
    seed: int = 0
    processes: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = "auto"
    """Training processes (torchrun DDP, one per GPU). auto: one per visible GPU for the scratch route, else 1."""


class VisionApiSpec(_Strict):
    """How the vision_api route calls its provider. Credentials are never here: each SDK reads its own
    (GOOGLE_APPLICATION_CREDENTIALS, the AWS chain, VISION_ENDPOINT + VISION_KEY for Azure)."""

    provider: Literal[("auto", *BUILTIN_PROVIDERS)] = "auto"
    """auto: the cheapest at the monthly volume (or local when images may not leave the premises)."""
    input: Path | None = None
    """Images to annotate (a file or a folder, searched recursively); default: the images under data.path."""
    output: Path | None = None
    """Also write the JSON-lines results here (they are always an MLflow artifact)."""
    endpoint: str | None = None
    """Regional or private endpoint; `http://host:port` is plaintext (a private gateway or a local fake)."""
    transport: Literal["grpc", "rest"] = "grpc"
    """google only."""
    region: str | None = None
    """aws only; default: the AWS chain's region, else us-east-1."""
    ocr_mode: Literal["text", "document"] = "text"
    """google only: TEXT_DETECTION or DOCUMENT_TEXT_DETECTION (dense documents)."""
    s3_bucket: str | None = None
    """aws only: send images as S3 objects in this bucket instead of raw bytes."""
    requests_per_minute: Annotated[float, Field(gt=0)] | None = None
    """Request quota; default: the provider's default (google 1,800/min, aws and azure 600/min)."""
    images_per_minute: Annotated[float, Field(gt=0)] | None = None
    """Images x features quota (google counts 1,800 per feature per minute by default)."""
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    retry_deadline_s: Annotated[float, Field(gt=0)] = 120.0
    """An image still failing with a retryable error this long after its first send is recorded as failed."""
    concurrency: Annotated[int, Field(ge=1, le=64)] | None = None
    """Requests in flight; default: sized from quota x measured latency (Little's law)."""
    cache: bool = True
    """Serve answers already paid for (same provider, feature, image bytes and API version) from the cache."""
    label_map: dict[str, list[Annotated[str, Field(min_length=1)]]] | None = None
    """classify only: each class -> the provider labels that mean it (case-insensitive)."""
    target_accuracy: Annotated[float, Field(gt=0, le=1)] | None = None
    """classify with label_map: the fit test must reach this accuracy, else the flow escalates to finetune."""
    fit_sample: Annotated[int, Field(ge=2, le=100_000)] = 100
    """Labelled images (stratified) the fit test sends."""


class TaskSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9-]+$", min_length=1, max_length=64)]
    """Names the MLflow experiment and the registered model."""
    task: Task
    classes: list[Annotated[str, Field(min_length=1)]] | None = None
    """classify only; read from the data folder when omitted."""
    data: DataSpec | None = None
    domain: Domain = Domain.natural
    constraints: Constraints = Constraints()
    route: Literal[("auto", *(route.value for route in Route))] = "auto"
    training: TrainingSpec = TrainingSpec()
    vision_api: VisionApiSpec = VisionApiSpec()

    @model_validator(mode="after")
    def _check_classes(self) -> TaskSpec:
        if self.classes is not None:
            if self.task != Task.classify:
                raise ValueError(
                    f"'classes' applies to task classify only; remove it for task {self.task.value}"
                )
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("'classes' has duplicates; list each class once")
            if len(self.classes) < 2:
                raise ValueError("'classes' needs at least two classes to classify between")
        label_map = self.vision_api.label_map
        if label_map is not None:
            if self.task != Task.classify:
                raise ValueError(
                    f"'vision_api.label_map' applies to task classify only, not {self.task.value}"
                )
            if self.classes is not None and sorted(label_map) != sorted(self.classes):
                raise ValueError(
                    f"'vision_api.label_map' must map exactly the classes {self.classes}; it maps {sorted(label_map)}"
                )
            if any(not labels for labels in label_map.values()):
                raise ValueError("'vision_api.label_map': give each class at least one provider label")
        elif self.vision_api.target_accuracy is not None:
            raise ValueError(
                "'vision_api.target_accuracy' needs 'vision_api.label_map' (classify through an API)"
            )
        return self

    @property
    def classify_by_api(self) -> bool:
        """A classify task whose classes a generic API's labels may serve (label_map given)."""
        return self.task == Task.classify and self.vision_api.label_map is not None

    @property
    def is_generic(self) -> bool:
        return self.task in GENERIC_TASKS

    def digest(self) -> str:
        """A stable hash of the spec's content, used to tag runs."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class SpecError(ValueError):
    """The spec file cannot be used; the message names each bad field and how to fix it."""


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid task spec ({error.error_count()} problem(s)):"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field; remove it or check its spelling (see `visionroute schema`)"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"  - {field}: {message}")
    return "\n".join(lines)


def parse_spec(raw: object, source: str = "spec", base_dir: Path | None = None) -> TaskSpec:
    """Validate already-parsed YAML/JSON; relative paths resolve against `base_dir`."""
    if not isinstance(raw, dict):
        raise SpecError(
            f"{source}: a task spec is a YAML mapping (name: ..., task: ...), got {type(raw).__name__}"
        )
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_format_validation_error(source, error)) from None
    if base_dir is None:
        return spec
    update: dict[str, object] = {}
    if spec.data and spec.data.path and not spec.data.path.is_absolute():
        update["data"] = spec.data.model_copy(update={"path": (base_dir / spec.data.path).resolve()})
    for field_name in ("input", "output"):
        value = getattr(spec.vision_api, field_name)
        if value is not None and not value.is_absolute():
            vision = update.get("vision_api", spec.vision_api)
            update["vision_api"] = vision.model_copy(update={field_name: (base_dir / value).resolve()})
    checkpoint = spec.training.checkpoint
    if checkpoint and not str(checkpoint).startswith("models:") and not checkpoint.is_absolute():
        update["training"] = spec.training.model_copy(
            update={"checkpoint": (base_dir / checkpoint).resolve()}
        )
    return spec.model_copy(update=update) if update else spec


def load_spec(path: str | Path) -> TaskSpec:
    """Read and validate a task spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file; pass the path of a task spec YAML (see examples/tasks/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#x} at offset {error.start}); save the spec "
            "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(raw, source=str(path), base_dir=path.resolve().parent)


def spec_json_schema() -> dict:
    return TaskSpec.model_json_schema()
