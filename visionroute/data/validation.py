"""Check every image once before training: quarantine what cannot be used, find duplicates and leakage.

Each image is decoded once here (JPEGs at reduced scale: libjpeg still entropy-decodes the whole stream, so
truncation and corruption are caught, at a fraction of the cost), hashed (sha256 of the bytes) and given a
thumbnail signature for near-duplicates. Nothing is dropped silently: every quarantined file has a reason.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from visionroute.data.dataset import DatasetError, ImageDataset, Sample, Skipped
from visionroute.data.images import ImageRejected, to_rgb

MAX_QUARANTINED_FRACTION = 0.2
"""More than this share of the files quarantined stops the run: the data, not a few files, is the problem."""
THUMB = 16
"""Near-duplicates are compared on THUMB x THUMB grey thumbnails."""
NEAR_DUPLICATE_CORRELATION = 0.9
"""Thumbnails (illumination plane removed) correlating at least this much are near-duplicates: resized,
recompressed or lightly edited copies. A plain 64- or 256-bit difference hash was tried first and called
distinct NEU steel photos duplicates at 2 bits: a shared left-to-right illumination gradient sets nearly
every bit. Removing the best-fit plane first leaves the structure that tells photos apart."""
_Y, _X = np.mgrid[0:THUMB, 0:THUMB]
_PLANE = np.stack([_X.ravel(), _Y.ravel(), np.ones(THUMB * THUMB)], axis=1).astype(np.float64)
_PLANE_PINV = np.linalg.pinv(_PLANE)
BIT_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    thumbnail: np.ndarray
    """THUMB*THUMB grey pixels (uint8); signatures are computed from all of them at once."""
    channels: int
    bit_depth: int


@dataclass
class ValidationReport:
    checked: int = 0
    quarantined: list[Skipped] = field(default_factory=list)
    exact_duplicates: list[list[dict]] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)
    label_conflicts: list[list[dict]] = field(default_factory=list)
    leaked_from_test: list[dict] = field(default_factory=list)
    channels: dict[int, int] = field(default_factory=dict)
    bit_depths: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "checked": self.checked,
            "quarantined": [{"path": s.path, "reason": s.reason} for s in self.quarantined],
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "label_conflicts": self.label_conflicts,
            "leaked_from_test": self.leaked_from_test,
            "channels": self.channels,
            "bit_depths": self.bit_depths,
            "warnings": self.warnings,
        }


def grey_thumbnail(image: Image.Image) -> np.ndarray:
    grey = image if image.mode == "L" else image.convert("L")
    return np.asarray(grey.resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8).ravel()


def signatures(thumbnails: np.ndarray) -> np.ndarray:
    """What near-duplicate detection compares: each grey thumbnail (a row) minus its best-fit illumination
    plane, scaled to unit norm. One matrix product for all rows: per-image numpy calls would hold the GIL."""
    pixels = thumbnails.astype(np.float64).reshape(len(thumbnails), -1)
    residual = pixels - (pixels @ _PLANE_PINV.T) @ _PLANE.T
    norms = np.linalg.norm(residual, axis=1, keepdims=True)
    # A flat image has no structure to match on: a zero signature never reaches the threshold.
    return np.where(norms > 1e-3 * THUMB, residual / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def thumbnail_signature(image: Image.Image) -> np.ndarray:
    return signatures(grey_thumbnail(image)[None, :])[0]


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


def inspect_image(dataset: ImageDataset, sample: Sample) -> ImageFacts:
    """Decode and fingerprint one sample; raises ImageRejected with the reason."""
    if sample.ref.startswith("npz:"):
        image = dataset.load(sample)
        return ImageFacts(hashlib.sha256(image.tobytes()).hexdigest(), grey_thumbnail(image), 1, 8)
    return inspect_file(sample.ref)


def _inspect_file_or_reason(ref: str) -> tuple[ImageFacts | None, str | None]:
    try:
        return inspect_file(ref), None
    except ImageRejected as error:
        return None, str(error)


def inspect_file(ref: str) -> ImageFacts:
    """Decode and fingerprint one image file; raises ImageRejected with the reason."""
    # The scan already read this file's header and refused bombs and unsupported formats.
    data = Path(ref).read_bytes()
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            if image.format == "JPEG" and mode in ("L", "RGB", "YCbCr"):
                image.draft("L", (4 * THUMB, 4 * THUMB))  # greyscale, reduced scale: all the signature needs
            image.load()
            if "exif" in image.info:  # parsing EXIF costs more than the thumbnail on small files
                image = ImageOps.exif_transpose(image)
            if image.mode not in ("L", "RGB"):
                image = to_rgb(image)
    except OSError as error:
        raise ImageRejected(
            "truncated file" if "truncated" in str(error) else f"corrupt image data: {error}"
        ) from None
    except (ValueError, SyntaxError) as error:
        raise ImageRejected(f"corrupt image data: {error}") from None
    channels = Image.getmodebands(mode)
    return ImageFacts(
        hashlib.sha256(data).hexdigest(), grey_thumbnail(image), channels, BIT_DEPTH.get(mode, 8)
    )


def _row(dataset: ImageDataset, sample: Sample) -> dict:
    return {"path": sample.ref, "label": dataset.classes[sample.label], "split": sample.split}


def _near_pairs(signatures: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """All pairs (i, j, correlation) with i < j at or above `threshold`, in blocks of about 64 MB."""
    pairs = []
    rows_per_block = max(1, 2**24 // max(1, len(signatures)))
    for start in range(0, len(signatures), rows_per_block):
        scores = signatures[start : start + rows_per_block] @ signatures.T
        rows, columns = np.nonzero(scores >= threshold)
        for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
            i = start + row
            if i < column:
                pairs.append((i, column, round(float(scores[row, column]), 4)))
    return pairs


PROCESS_POOL_FROM = 512
"""From this many image files on, validation uses processes: per-file work holds the GIL, so threads do not
scale on small files (2 threads were no faster than 1 on NEU's 200 px JPEGs)."""


def _pool(dataset: ImageDataset, workers: int):
    files = not any(sample.ref.startswith("npz:") for sample in dataset.samples[:1])
    if workers > 1 and files and len(dataset.samples) >= PROCESS_POOL_FROM:
        # fork: the children run only Pillow, hashlib and numpy without BLAS, so a parent that has loaded
        # torch (and its thread pools) is safe to fork here; spawn would re-import everything per worker.
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(max_workers=workers)


def validate(
    dataset: ImageDataset,
    workers: int = 2,
    progress: bool = True,
    max_fraction: float = MAX_QUARANTINED_FRACTION,
) -> tuple[ImageDataset, ValidationReport]:
    """Check every sample; returns the dataset without quarantined files, and the report.

    Raises DatasetError when more than `max_fraction` of the files are quarantined (the report is attached to
    the error as `.report`, so it can still be written out).
    """
    report = ValidationReport(quarantined=list(dataset.skipped))

    def work(sample: Sample):
        try:
            return sample, inspect_image(dataset, sample), None
        except ImageRejected as error:
            return sample, None, str(error)

    facts: dict[str, ImageFacts] = {}
    with _pool(dataset, workers) as pool:
        if isinstance(pool, ProcessPoolExecutor):
            refs = [sample.ref for sample in dataset.samples]
            outcomes = pool.map(_inspect_file_or_reason, refs, chunksize=64)
            results = ((sample, *outcome) for sample, outcome in zip(dataset.samples, outcomes, strict=True))
        else:
            results = pool.map(work, dataset.samples)
        for sample, fact, reason in tqdm(
            results,
            total=len(dataset.samples),
            desc="validate",
            unit="img",
            disable=not progress,
            leave=False,
        ):
            if fact is None:
                report.quarantined.append(Skipped(sample.ref, reason))
            else:
                facts[sample.ref] = fact
    report.checked = len(dataset.samples) + len(dataset.skipped)
    kept = [s for s in dataset.samples if s.ref in facts]
    dataset = replace(dataset, samples=kept, skipped=report.quarantined, fingerprints=facts)
    for fact in facts.values():
        report.channels[fact.channels] = report.channels.get(fact.channels, 0) + 1
        report.bit_depths[fact.bit_depth] = report.bit_depths.get(fact.bit_depth, 0) + 1

    fraction = len(report.quarantined) / max(1, report.checked)
    if fraction > max_fraction:
        error = DatasetError(
            f"{len(report.quarantined)} of {report.checked} files ({fraction:.0%}) were quarantined, over the "
            f"{max_fraction:.0%} limit: fix the data (reasons in the quarantine report) before training"
        )
        error.report = report
        raise error

    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in kept:
        groups[facts[sample.ref].sha256].append(sample)
    for members in groups.values():
        if len(members) > 1:
            rows = [_row(dataset, s) for s in members]
            report.exact_duplicates.append(rows)
            if len({row["label"] for row in rows}) > 1:
                report.label_conflicts.append(rows)
    kept_signatures = signatures(np.array([facts[s.ref].thumbnail for s in kept]).reshape(len(kept), -1))
    for i, j, score in _near_pairs(kept_signatures, NEAR_DUPLICATE_CORRELATION):
        if facts[kept[i].ref].sha256 != facts[kept[j].ref].sha256:
            report.near_duplicates.append(
                {"a": _row(dataset, kept[i]), "b": _row(dataset, kept[j]), "correlation": score}
            )
    if report.exact_duplicates:
        report.warnings.append(f"{len(report.exact_duplicates)} group(s) of identical files")
    if report.near_duplicates:
        report.warnings.append(
            f"{len(report.near_duplicates)} near-duplicate pair(s) (thumbnail correlation >= "
            f"{NEAR_DUPLICATE_CORRELATION})"
        )
    if report.label_conflicts:
        report.warnings.append(f"{len(report.label_conflicts)} identical file(s) carry different labels")
    return dataset, report


def remove_leakage(dataset: ImageDataset, report: ValidationReport) -> ImageDataset:
    """Drop from test every image that is (near-)identical to one in train or val, and say so. Val counts:
    early stopping and model selection looked at it."""
    facts: dict[str, ImageFacts] = dataset.fingerprints
    train = [s for s in dataset.samples if s.split in ("train", "val") and s.ref in facts]
    if not train:
        return dataset
    train_sha = {facts[s.ref].sha256 for s in train}
    train_signatures = signatures(np.array([facts[s.ref].thumbnail for s in train]))
    leaked = set()
    for sample in dataset.samples:
        if sample.split != "test" or sample.ref not in facts:
            continue
        fact = facts[sample.ref]
        closest = float((train_signatures @ signatures(fact.thumbnail[None, :])[0]).max())
        if fact.sha256 in train_sha or closest >= NEAR_DUPLICATE_CORRELATION:
            leaked.add(sample.ref)
            report.leaked_from_test.append(_row(dataset, sample))
    if leaked:
        report.warnings.append(
            f"{len(leaked)} test image(s) duplicate train/val images and were removed from "
            "test (leakage would inflate the reported accuracy)"
        )
    return replace(dataset, samples=[s for s in dataset.samples if s.ref not in leaked])
