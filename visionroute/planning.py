"""From a spec file to a decision: the steps the CLI and the Prefect flow share (no Prefect here)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from visionroute.data.dataset import (
    DatasetError,
    ImageDataset,
    assign_splits,
    held_out_split_given,
    native_shape,
    scan_dataset,
)
from visionroute.data.images import IMAGE_SUFFIXES
from visionroute.data.validation import ValidationReport, check_leakage, validate
from visionroute.decision.costs import load_prices
from visionroute.decision.policy import DEFAULT_POLICY
from visionroute.decision.rules import DataSummary, Decision, decide
from visionroute.spec import Domain, TaskSpec, load_spec


@dataclass
class Plan:
    spec: TaskSpec
    dataset: ImageDataset | None
    summary: DataSummary
    decision: Decision
    validation: ValidationReport | None = None


def read_data(spec: TaskSpec) -> tuple[ImageDataset | None, DataSummary]:
    """Scan data.path when given (headers only); otherwise trust data.labeled_examples."""
    data = spec.data
    if data is None or data.path is None:
        return None, DataSummary(labeled_examples=(data.labeled_examples if data else None) or 0)
    if spec.is_generic and _unlabelled(data.path):
        # Images for a Vision API to annotate, not training data: the vision_api route reads them itself.
        return None, DataSummary(labeled_examples=0)
    dataset = scan_dataset(data.path, spec.classes)
    # The folder is the truth; a different declared figure becomes a warning in `plan`.
    return dataset, _summary(dataset)


def _summary(dataset: ImageDataset) -> DataSummary:
    return DataSummary(
        labeled_examples=len(dataset.samples),
        per_class=dataset.per_class(),
        native_size=native_shape(dataset)[1],
    )


def _unlabelled(path: Path) -> bool:
    """An image file, or a folder of images with no class sub-folders."""
    if path.is_file():
        return path.suffix.lower() in IMAGE_SUFFIXES
    return path.is_dir() and not any(
        child.is_dir() and not child.name.startswith(".") for child in path.iterdir()
    )


def plan(
    spec_path: str, prices_path: str | None = None, check_images: bool = False, measure_domain: bool = False
) -> Plan:
    """Load, scan and decide. Raises SpecError, DatasetError or CannotDecide with a message for a person.

    With `check_images` (the flow), every image is decoded and fingerprinted first: quarantined files leave
    the counts, the splits are fixed (seeded, duplicate groups kept in one split) and test images of a given
    split that copy training images are reported (or removed with `data.leakage: remove`).
    Without it (`visionroute decide`), counts come from file headers alone, which is fast on large folders.
    The domain is measured (pretrained against random features, well under a minute for 1,000 images) for
    `domain: auto`, with `measure_domain`, and in the flow for every specific task with data.
    """
    spec = load_spec(spec_path)
    dataset, summary = read_data(spec)
    report = None
    if dataset is not None and check_images:
        dataset, report = validate(dataset)
        given = held_out_split_given(dataset)
        remove = spec.data.leakage == "remove"
        dataset = check_leakage(assign_splits(dataset, seed=spec.training.seed), report, remove=remove)
        summary = _summary(dataset)
        evaluation = evaluation_plan(dataset, report, given, spec.data.leakage)
    wants_measure = spec.domain == Domain.auto or measure_domain or check_images
    if dataset is not None and not spec.is_generic and wants_measure and len(dataset.classes) >= 2:
        from visionroute.data.domain import measure_domain as measure

        measured = measure(dataset, seed=spec.training.seed).to_dict()
        summary = replace(summary, domain_measurement=measured)
    # The flow trains on this machine: its decision picks the model for this device (`decide` plans for a GPU).
    device = _training_device() if check_images else "gpu"
    decision = decide(spec, summary, load_prices(prices_path), device=device)
    if report is not None:
        decision.warnings += report.warnings
        decision.evaluation = evaluation
        if evaluation["cannot_promote"]:
            decision.warnings.append(
                f"{evaluation['cannot_promote']}; the model will be registered as challenger only"
            )
    if (
        spec.data
        and spec.data.labeled_examples is not None
        and dataset is not None
        and spec.data.labeled_examples != summary.labeled_examples
    ):
        decision.warnings.append(
            f"data.labeled_examples says {spec.data.labeled_examples:,} but {summary.labeled_examples:,} usable "
            f"images were found in {spec.data.path}; the count found was used"
        )
    if dataset is not None and not check_images and dataset.root.suffix != ".npz":
        decision.warnings.append(
            f"{len(dataset.samples):,} image(s) were checked by their headers only; `visionroute run` decodes "
            "every file and quarantines the unreadable ones (truncated, corrupt), so its counts may be lower"
        )
    if dataset is not None and dataset.skipped:
        decision.warnings.append(
            f"{len(dataset.skipped)} file(s) in the data folder will be skipped (listed in skipped.json)"
        )
    return Plan(spec, dataset, summary, decision, report)


def evaluation_plan(dataset: ImageDataset, report: ValidationReport, given: bool, leakage: str) -> dict:
    """How the trained model will be judged, said before training: where the test split comes from, its size,
    its leakage and what was done about it, and whether it is large enough to choose a champion."""
    per_class = dataset.counts().get("test", {})
    leaked = len(report.leaked_from_test)
    if not leaked:
        handling = "no test image has a copy in train/val"
    elif leakage == "remove":
        handling = f"{leaked} test image(s) with a copy in train/val removed (data.leakage: remove)"
    else:
        handling = (
            f"{leaked} test image(s) with a copy in train/val kept; accuracy without them reported beside it"
        )
    if given:
        source = "given with the data, kept as given" + (
            " minus its leaked images" if leaked and leakage == "remove" else ""
        )
    else:
        source = "made by visionroute: stratified, each group of duplicates in one split"
    return {
        "test_split": source,
        "test_images": sum(per_class.values()),
        "test_per_class": per_class,
        "leakage": leakage,
        "leaked_test_images": leaked,
        "leakage_handling": handling,
        "cannot_promote": DEFAULT_POLICY.test_split_problem(per_class),
    }


__all__ = ["DatasetError", "Plan", "plan", "read_data"]


def _training_device() -> str:
    from visionroute.training.engine import training_device

    return training_device()
