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
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from visionroute.data.dataset import DatasetError, ImageDataset, Sample, Skipped
from visionroute.data.images import ImageRejected, to_rgb

MAX_QUARANTINED_FRACTION = 0.2
"""More than this share of the files quarantined stops the run: the data, not a few files, is the problem."""
THUMB = 32
"""Each image is kept as a THUMB x THUMB grey thumbnail (1 KB); signatures are sampled from it."""
SIGNATURE = 16
"""Signatures are SIGNATURE x SIGNATURE samples of the thumbnail with the illumination plane removed."""
CANDIDATES = 10
"""Each image is compared closely (with alignment) with its this many nearest neighbours by signature."""
NEAR_DUPLICATE_RATIO = 0.3
"""Two images are near-duplicates when their aligned distance (1 - correlation) is at most this share of
their own neighbourhood's: the median aligned distance to their CANDIDATES nearest images. Relative, so that
the same rule holds on 8 px digits, where most images of a class correlate above 0.9, and on 500 px photos,
where distinct images hardly correlate at all. Calibrated with planted copies by bench/near_duplicates.py
(figures in bench/RESULTS.md)."""
NEAR_DUPLICATE_MAX_DISTANCE = 0.1
"""And never further apart than this (correlation 0.9): in a sparse neighbourhood a relative rule alone would
call two merely similar photos copies."""
ZOOMS = (1.03, 1.06, 1.1)
"""Alignment tried when comparing two candidates: the window of one image zoomed by these factors, at 3 x 3
positions, against the other's whole frame, both ways. A crop of a few percent shifts a 28 px image by a
pixel, enough to make a copy look as distinct as two different X-rays without it."""
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
    """Test images with a copy in train/val (user-given splits: visionroute's own keep copies together)."""
    leakage_removed: bool = False
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
            "leakage_removed": self.leakage_removed,
            "channels": self.channels,
            "bit_depths": self.bit_depths,
            "warnings": self.warnings,
        }


def grey_thumbnail(image: Image.Image) -> np.ndarray:
    grey = image if image.mode == "L" else image.convert("L")
    return np.asarray(grey.resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8).ravel()


def _axis(zoom: float, offset: float) -> np.ndarray:
    """SIGNATURE x THUMB bilinear weights sampling the window [offset, offset + 1/zoom] of one axis."""
    grid = (np.arange(SIGNATURE) + 0.5) / SIGNATURE
    position = np.clip((offset + grid / zoom) * THUMB - 0.5, 0, THUMB - 1)
    low = np.minimum(np.floor(position), THUMB - 2).astype(int)
    weights = np.zeros((SIGNATURE, THUMB), dtype=np.float32)
    weights[np.arange(SIGNATURE), low] = 1 - (position - low)
    weights[np.arange(SIGNATURE), low + 1] += position - low
    return weights


_WARPS = [(_axis(1.0, 0.0), _axis(1.0, 0.0))] + [
    (_axis(zoom, top), _axis(zoom, left))
    for zoom in ZOOMS
    for top in (0.0, (1 - 1 / zoom) / 2, 1 - 1 / zoom)
    for left in (0.0, (1 - 1 / zoom) / 2, 1 - 1 / zoom)
]
"""(rows, columns) sampling matrices: the whole frame first, then each zoomed window."""
_Y, _X = np.mgrid[0:SIGNATURE, 0:SIGNATURE]
_PLANE = np.stack([_X.ravel(), _Y.ravel(), np.ones(SIGNATURE * SIGNATURE)], axis=1).astype(np.float32)
_PLANE_PINV = np.linalg.pinv(_PLANE)


def signatures(thumbnails: np.ndarray, warp: int = 0) -> np.ndarray:
    """What near-duplicate detection compares: each thumbnail (a row) sampled through `warp` (0: the whole
    frame), minus its best-fit illumination plane, scaled to unit norm. A shared left-to-right illumination
    gradient made a difference hash call distinct NEU steel photos duplicates; the residual keeps the
    structure that tells them apart. Two matrix products for all rows (the sampling is separable): per-image
    numpy calls would hold the GIL."""
    count = len(thumbnails)
    rows, columns = _WARPS[warp]
    pixels = thumbnails.reshape(count * THUMB, THUMB).astype(np.float32)
    across = (pixels @ columns.T).reshape(count, THUMB, SIGNATURE).transpose(1, 0, 2)
    sampled = (rows @ across.reshape(THUMB, count * SIGNATURE)).reshape(SIGNATURE, count, SIGNATURE)
    sampled = sampled.transpose(1, 0, 2).reshape(count, SIGNATURE * SIGNATURE)
    residual = sampled - (sampled @ _PLANE_PINV.T) @ _PLANE.T
    norms = np.linalg.norm(residual, axis=1, keepdims=True)
    # A flat image has no structure to match on: a zero signature never correlates.
    return np.where(norms > 1e-3 * SIGNATURE, residual / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def thumbnail_signature(image: Image.Image) -> np.ndarray:
    return signatures(grey_thumbnail(image)[None, :])[0]


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


def _nearest(signature: np.ndarray, k: int) -> np.ndarray:
    """Each row's k most correlated other rows, in blocks of about 64 MB of scores."""
    k = min(k, len(signature) - 1)
    nearest = np.zeros((len(signature), max(k, 0)), dtype=np.int64)
    if k <= 0:
        return nearest
    rows_per_block = max(1, 2**24 // len(signature))
    for start in range(0, len(signature), rows_per_block):
        scores = signature[start : start + rows_per_block] @ signature.T
        scores[np.arange(len(scores)), np.arange(start, start + len(scores))] = -np.inf
        nearest[start : start + len(scores)] = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return nearest


def aligned_distances(thumbnails: np.ndarray, nearest: np.ndarray, align: bool = True) -> np.ndarray:
    """For each row i and each of its candidates nearest[i, j]: 1 - their best correlation over the
    alignments (a zoomed window of either image against the other's whole frame)."""
    count, k = nearest.shape
    whole = signatures(thumbnails)
    warps = len(_WARPS) if align else 1
    # Every pair both ways, grouped by the image whose window is zoomed: its warps are computed once.
    source = np.concatenate([np.repeat(np.arange(count), k), nearest.ravel()])
    target = np.concatenate([nearest.ravel(), np.repeat(np.arange(count), k)])
    order = np.argsort(source, kind="stable")
    bounds = np.searchsorted(source[order], np.arange(count + 1))
    best = np.empty(len(source), dtype=np.float32)
    block = 1024
    for start in range(0, count, block):
        stop = min(count, start + block)
        warped = np.stack([signatures(thumbnails[start:stop], warp) for warp in range(warps)], axis=1)
        for image in range(start, stop):
            edges = order[bounds[image] : bounds[image + 1]]
            best[edges] = (warped[image - start] @ whole[target[edges]].T).max(axis=0)
    both = np.maximum(best[: count * k], best[count * k :])
    return 1.0 - both.reshape(count, k)


def near_duplicate_pairs(
    thumbnails: np.ndarray,
    ratio: float = NEAR_DUPLICATE_RATIO,
    max_distance: float = NEAR_DUPLICATE_MAX_DISTANCE,
    candidates: int = CANDIDATES,
    align: bool = True,
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, aligned distance), i < j, of near-duplicate thumbnails (rows; exact copies removed first).

    Each image's CANDIDATES nearest neighbours by signature are compared again with alignment; a pair is a
    near-duplicate when its aligned distance is at most `ratio` times the smaller of the two images' median
    aligned distance to their candidates, and at most `max_distance`. `align=False` skips the alignment
    (for bench/near_duplicates.py's comparison).
    """
    if len(thumbnails) < 2:
        return []
    nearest = _nearest(signatures(thumbnails), candidates)
    # Thousands of small matrix products: one BLAS thread each. With two, each product took 13 ms instead of
    # 0.7 ms on a busy 2-core machine (the threads wait for each other); the work is too small to share.
    with threadpool_limits(limits=1, user_api="blas"):
        distance = aligned_distances(thumbnails, nearest, align)
    scale = np.median(distance, axis=1)
    pairs: dict[tuple[int, int], float] = {}
    for i, j in zip(*np.nonzero(distance <= np.minimum(max_distance, ratio * scale[:, None])), strict=True):
        other = int(nearest[i, j])
        if distance[i, j] <= ratio * scale[other]:
            key = (min(int(i), other), max(int(i), other))
            pairs[key] = round(float(distance[i, j]), 4)
    return [(i, j, d) for (i, j), d in sorted(pairs.items())]


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
                image.draft("L", (2 * THUMB, 2 * THUMB))  # greyscale, reduced scale: all the signature needs
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
    # The same image under two labels teaches nothing right: every copy leaves training, listed with the reason.
    for rows in report.label_conflicts:
        labels = sorted({row["label"] for row in rows})
        reason = f"identical file labelled {' and '.join(labels)}: label conflict, left out (keep one copy)"
        report.quarantined += [Skipped(row["path"], reason) for row in rows]
    if report.label_conflicts:
        conflicted = {row["path"] for rows in report.label_conflicts for row in rows}
        kept = [s for s in kept if s.ref not in conflicted]
        groups = {sha: members for sha, members in groups.items() if members[0].ref not in conflicted}
        dataset = replace(dataset, samples=kept, skipped=report.quarantined)
    # Near-duplicates among distinct contents only: exact copies would crowd each other's neighbourhoods.
    unique = [members[0] for members in groups.values()]
    thumbnails = np.array([facts[s.ref].thumbnail for s in unique]).reshape(len(unique), -1)
    union = {sample.ref: sample.ref for sample in kept}

    def root(ref: str) -> str:
        while union[ref] != ref:
            union[ref] = union[union[ref]]
            ref = union[ref]
        return ref

    for members in groups.values():
        for sample in members[1:]:
            union[root(sample.ref)] = root(members[0].ref)
    for i, j, distance in near_duplicate_pairs(thumbnails):
        report.near_duplicates.append(
            {"a": _row(dataset, unique[i]), "b": _row(dataset, unique[j]), "distance": distance}
        )
        union[root(unique[j].ref)] = root(unique[i].ref)
    members_of: dict[str, list[str]] = defaultdict(list)
    for sample in kept:
        members_of[root(sample.ref)].append(sample.ref)
    dataset.duplicate_groups = {
        ref: number
        for number, refs in enumerate(refs for refs in members_of.values() if len(refs) > 1)
        for ref in refs
    }
    if report.exact_duplicates:
        report.warnings.append(f"{len(report.exact_duplicates)} group(s) of identical files")
    if report.near_duplicates:
        report.warnings.append(
            f"{len(report.near_duplicates)} near-duplicate pair(s) (resized, recompressed, cropped or "
            "brightened copies; listed in data/validation.json)"
        )
    if report.label_conflicts:
        report.warnings.append(
            f"{len(report.label_conflicts)} identical file(s) carry different labels; every copy was left out "
            "of training (listed in the quarantine)"
        )
    return dataset, report


def _copies(dataset: ImageDataset, split: str, of: tuple[str, ...]) -> list[Sample]:
    """Images of `split` with an exact or near copy in the splits `of` (duplicate groups from `validate`)."""
    group = dataset.duplicate_groups
    seen = {group.get(s.ref) for s in dataset.samples if s.split in of} - {None}
    return [s for s in dataset.split(split) if group.get(s.ref, -1) in seen]


def leaked_test_images(dataset: ImageDataset) -> list[Sample]:
    """Test images with an exact or near copy in train or val. Val counts: early stopping and model selection
    looked at it."""
    return _copies(dataset, "test", ("train", "val"))


def check_leakage(dataset: ImageDataset, report: ValidationReport, remove: bool = False) -> ImageDataset:
    """Find test images that copy train/val images, list them in the report and say what was done: kept by
    default (a given test split stays comparable with published results; the accuracy without them is
    reported beside it), dropped from test with `remove`."""
    leaked = leaked_test_images(dataset)
    report.leaked_from_test = [_row(dataset, s) for s in leaked]
    report.leakage_removed = remove
    in_val = _copies(dataset, "val", ("train",))
    if in_val:
        report.warnings.append(
            f"{len(in_val)} validation image(s) have a copy in train: early stopping and model selection see "
            "them (the test figures do not)"
        )
    if not leaked:
        return dataset
    total = len(dataset.split("test"))
    if remove:
        report.warnings.append(
            f"{len(leaked)} of {total} test image(s) have a copy in train/val and were removed from test "
            "(data.leakage: remove)"
        )
        refs = {s.ref for s in leaked}
        return replace(dataset, samples=[s for s in dataset.samples if s.ref not in refs])
    report.warnings.append(
        f"{len(leaked)} of {total} test image(s) have a copy in train/val; the given test split is kept as is "
        "and the accuracy on the other test images is reported beside it (data.leakage: remove drops them)"
    )
    return dataset
