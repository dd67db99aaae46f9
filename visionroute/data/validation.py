"""Check every image once before training: quarantine what cannot be used, find duplicates and leakage.

Each image is decoded once here (JPEGs at reduced scale: libjpeg still entropy-decodes the whole stream, so
truncation and corruption are caught, at a fraction of the cost), hashed (sha256 of the bytes) and given a
64-bit difference hash for near-duplicates. Nothing is dropped silently: every quarantined file has a reason.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from visionroute.data.dataset import DatasetError, ImageDataset, Sample, Skipped
from visionroute.data.images import ImageRejected, read_header, to_rgb

MAX_QUARANTINED_FRACTION = 0.2
"""More than this share of the files quarantined stops the run: the data, not a few files, is the problem."""
NEAR_DUPLICATE_BITS = 4
"""Difference hashes this many bits apart or fewer are near-duplicates (resized, recompressed, lightly edited)."""
BIT_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    dhash: int
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


def difference_hash(image: Image.Image) -> int:
    """64-bit dHash: is each pixel brighter than its right neighbour, on a 9x8 greyscale thumbnail."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def inspect_image(dataset: ImageDataset, sample: Sample) -> ImageFacts:
    """Decode and fingerprint one sample; raises ImageRejected with the reason."""
    if sample.ref.startswith("npz:"):
        image = dataset.load(sample)
        return ImageFacts(hashlib.sha256(image.tobytes()).hexdigest(), difference_hash(image), 1, 8)
    from pathlib import Path

    path = Path(sample.ref)
    read_header(path)  # bombs and unsupported formats are refused before any pixel is decoded
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
    except OSError as error:
        raise ImageRejected(
            "truncated file" if "truncated" in str(error) else f"corrupt image data: {error}"
        ) from None
    except (ValueError, SyntaxError) as error:
        raise ImageRejected(f"corrupt image data: {error}") from None
    channels = Image.getmodebands(mode)
    return ImageFacts(
        hashlib.sha256(data).hexdigest(), difference_hash(image), channels, BIT_DEPTH.get(mode, 8)
    )


def _row(dataset: ImageDataset, sample: Sample) -> dict:
    return {"path": sample.ref, "label": dataset.classes[sample.label], "split": sample.split}


def _near_pairs(hashes: np.ndarray, max_bits: int) -> list[tuple[int, int, int]]:
    """All pairs (i, j, distance) with i < j within `max_bits`, in blocks to bound memory."""
    pairs = []
    for start in range(0, len(hashes), 2048):
        block = hashes[start : start + 2048]
        xor = block[:, None] ^ hashes[None, :]
        distance = np.unpackbits(xor.view(np.uint8), axis=-1).reshape(len(block), len(hashes), -1).sum(-1)
        rows, columns = np.nonzero(distance <= max_bits)
        for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
            i = start + row
            if i < column:
                pairs.append((i, column, int(distance[row, column])))
    return pairs


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
    with ThreadPoolExecutor(max_workers=workers) as pool:
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
    hashes = np.array([facts[s.ref].dhash for s in kept], dtype=np.uint64)
    for i, j, bits in _near_pairs(hashes, NEAR_DUPLICATE_BITS):
        if facts[kept[i].ref].sha256 != facts[kept[j].ref].sha256:
            report.near_duplicates.append(
                {"a": _row(dataset, kept[i]), "b": _row(dataset, kept[j]), "bits": bits}
            )
    if report.exact_duplicates:
        report.warnings.append(f"{len(report.exact_duplicates)} group(s) of identical files")
    if report.near_duplicates:
        report.warnings.append(
            f"{len(report.near_duplicates)} near-duplicate pair(s) (dHash within {NEAR_DUPLICATE_BITS} bits)"
        )
    if report.label_conflicts:
        report.warnings.append(f"{len(report.label_conflicts)} identical file(s) carry different labels")
    return dataset, report


def remove_leakage(dataset: ImageDataset, report: ValidationReport) -> ImageDataset:
    """Drop from test every image that is (near-)identical to a training image, and say so."""
    facts: dict[str, ImageFacts] = dataset.fingerprints
    train = [s for s in dataset.samples if s.split == "train" and s.ref in facts]
    if not train:
        return dataset
    train_sha = {facts[s.ref].sha256 for s in train}
    train_hashes = np.array([facts[s.ref].dhash for s in train], dtype=np.uint64)
    leaked = set()
    for sample in dataset.samples:
        if sample.split != "test" or sample.ref not in facts:
            continue
        fact = facts[sample.ref]
        distance = np.unpackbits((train_hashes ^ np.uint64(fact.dhash)).view(np.uint8)).reshape(-1, 64).sum(1)
        if fact.sha256 in train_sha or (distance <= NEAR_DUPLICATE_BITS).any():
            leaked.add(sample.ref)
            report.leaked_from_test.append(_row(dataset, sample))
    if leaked:
        report.warnings.append(
            f"{len(leaked)} test image(s) duplicate training images and were removed from "
            "test (leakage would inflate the reported accuracy)"
        )
    return replace(dataset, samples=[s for s in dataset.samples if s.ref not in leaked])
