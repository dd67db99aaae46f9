"""One labelled image dataset abstraction, read from class folders, a CSV manifest or a MedMNIST-style .npz.

Every file found is either a sample or a `Skipped` entry with its reason: nothing is dropped silently.
Splits have three roles: train (fit), val (early stopping, probe selection) and test (held out for the
final metrics and the registry comparison).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from visionroute.data.images import IMAGE_SUFFIXES, ImageRejected, load_rgb, read_header

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """The data cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Sample:
    ref: str
    """File path, or `npz:<split>:<index>` for an array row."""
    label: int
    split: str | None
    size: tuple[int, int] = (0, 0)
    mode: str = ""


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class ImageDataset:
    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    _arrays: dict | None = field(default=None, repr=False)
    fingerprints: dict = field(default_factory=dict, repr=False)
    """ref -> ImageFacts (sha256, thumbnail, channels, bit depth), filled by validation."""
    duplicate_groups: dict = field(default_factory=dict, repr=False)
    """ref -> group number for each image with an exact or near copy, filled by validation; `assign_splits`
    keeps each group in one split."""

    def per_class(self) -> dict[str, int]:
        counts = Counter(sample.label for sample in self.samples)
        return {name: counts.get(index, 0) for index, name in enumerate(self.classes)}

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: count}}."""
        table: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(self.classes, 0))
        for sample in self.samples:
            table[sample.split or "unsplit"][self.classes[sample.label]] += 1
        return dict(table)

    def split(self, name: str) -> list[Sample]:
        return [sample for sample in self.samples if sample.split == name]

    def load(self, sample: Sample) -> Image.Image:
        """Decoded 8-bit RGB image; raises ImageRejected."""
        if sample.ref.startswith("npz:"):
            _, split, index = sample.ref.split(":")
            return Image.fromarray(self._arrays[f"{split}_images"][int(index)]).convert("RGB")
        return load_rgb(Path(sample.ref))

    def split_manifest(self) -> dict:
        """The exact assignment of samples to splits, saved with each run."""
        rows = sorted((s.split or "", s.ref, self.classes[s.label]) for s in self.samples)
        return {"classes": self.classes, "rows": [{"split": a, "ref": b, "label": c} for a, b, c in rows]}

    def split_digest(self, split: str = "test") -> str:
        rows = [row for row in self.split_manifest()["rows"] if row["split"] == split]
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]

    def without(self, rejected: dict[str, str]) -> ImageDataset:
        """A copy with the samples whose ref is in `rejected` moved to the skipped list."""
        kept = [sample for sample in self.samples if sample.ref not in rejected]
        skipped = self.skipped + [Skipped(ref, reason) for ref, reason in rejected.items()]
        return replace(self, samples=kept, skipped=skipped)

    def profile(self) -> dict:
        widths = [s.size[0] for s in self.samples if s.size[0]]
        heights = [s.size[1] for s in self.samples if s.size[1]]
        per_class = self.per_class()
        nonzero = [count for count in per_class.values() if count]
        return {
            "source": str(self.root),
            "classes": self.classes,
            "labeled_examples": len(self.samples),
            "per_class": per_class,
            "per_split": self.counts(),
            "imbalance_ratio": round(max(nonzero) / min(nonzero), 2) if nonzero else None,
            "width": _spread(widths),
            "height": _spread(heights),
            "modes": dict(Counter(s.mode for s in self.samples)),
            "skipped": len(self.skipped),
        }


GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def native_shape(dataset: ImageDataset) -> tuple[int, int]:
    """(channels, median short side in px) of the dataset's images from their headers: 1 channel when every
    image is greyscale, so that grey data trains as grey instead of three identical channels."""
    sides = [min(s.size) for s in dataset.samples if s.size[0]]
    grey = bool(dataset.samples) and all(s.mode in GREY_MODES for s in dataset.samples)
    return (1 if grey else 3), (int(np.median(sides)) if sides else 0)


def _spread(values: list[int]) -> dict | None:
    if not values:
        return None
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def _scan_class_folder(
    folder: Path, label: int, split: str | None, root: Path | None = None
) -> tuple[list[Sample], list[Skipped]]:
    """Every file under `folder`. Two rules, listed in skipped.json with the reason like any bad file: hidden
    files and files in hidden folders (a name starting with '.') are left out, and a symlink is followed only
    when it resolves inside the dataset (`root`; the CSV manifest refuses paths outside its folder alike)."""
    samples, skipped = [], []
    root = (root or folder).resolve()
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        hidden = [part for part in path.relative_to(folder).parts if part.startswith(".")]
        if hidden:
            skipped.append(Skipped(str(path), f"hidden ({hidden[0]!r} starts with '.'); left out"))
            continue
        if not path.resolve().is_relative_to(root):
            skipped.append(
                Skipped(str(path), f"links to {path.resolve()}, outside the dataset folder {root}; refused")
            )
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(Skipped(str(path), f"not an image file type ({path.suffix or 'no extension'})"))
            continue
        try:
            fmt, mode, size = read_header(path)
        except ImageRejected as error:
            skipped.append(Skipped(str(path), str(error)))
            continue
        samples.append(Sample(str(path), label, split, size, mode))
    return samples, skipped


def _scan_folders(root: Path, classes: list[str] | None) -> ImageDataset:
    split_dirs = [root / name for name in SPLITS if (root / name).is_dir()]
    layout = [(d.name, d) for d in split_dirs] if split_dirs else [(None, root)]
    found = sorted(
        {p.name for _, d in layout for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
    )
    if not found:
        raise DatasetError(
            f"{root}: no class folders found; put the images of each class in their own sub-folder "
            "(optionally under train/ val/ test/)"
        )
    if classes is None:
        classes = found
    else:
        missing = [name for name in classes if name not in found]
        extra = [name for name in found if name not in classes]
        if missing:
            raise DatasetError(f"{root}: no folder for class(es) {missing}; create them or fix 'classes'")
        if extra:
            raise DatasetError(
                f"{root}: folder(s) {extra} are not in 'classes' {classes}; add them to 'classes' or move them out"
            )
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    for split, base in layout:
        for label, name in enumerate(classes):
            folder = base / name
            if folder.is_dir():
                more, bad = _scan_class_folder(folder, label, split, root)
                samples += more
                skipped += bad
    dataset = ImageDataset(root, list(classes), samples, skipped)
    empty = [name for name, count in dataset.per_class().items() if count == 0]
    if empty:
        raise DatasetError(
            f"{root}: class folder(s) {empty} hold no usable images; add images or remove them"
        )
    return dataset


def _scan_npz(path: Path, classes: list[str] | None) -> ImageDataset:
    try:
        arrays = dict(np.load(path))
    except Exception as error:  # numpy raises several types for a bad archive
        raise DatasetError(f"{path}: not a readable .npz archive ({error})") from None
    splits = [name for name in SPLITS if f"{name}_images" in arrays]
    if not splits:
        raise DatasetError(f"{path}: expected arrays named train_images/train_labels (MedMNIST layout)")
    samples = []
    labels_seen: set[int] = set()
    for split in splits:
        images, labels = arrays[f"{split}_images"], arrays.get(f"{split}_labels")
        if labels is None or len(labels) != len(images):
            got = "none" if labels is None else len(labels)
            raise DatasetError(f"{path}: {split}_images has {len(images)} rows but {split}_labels has {got}")
        labels = np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(int)
        labels_seen.update(labels.tolist())
        height, width = images.shape[1:3]
        mode = "L" if images.ndim == 3 else "RGB"
        samples += [
            Sample(f"npz:{split}:{i}", int(y), split, (width, height), mode) for i, y in enumerate(labels)
        ]
    count = max(labels_seen) + 1
    classes = classes or [str(index) for index in range(count)]
    if min(labels_seen) < 0 or count > len(classes):
        raise DatasetError(
            f"{path}: labels {sorted(labels_seen)} fall outside the {len(classes)} classes {classes}"
        )
    return ImageDataset(path, list(classes), samples, [], arrays)


def _scan_manifest(path: Path, classes: list[str] | None) -> ImageDataset:
    """A CSV with a `path,label[,split]` header; paths are relative to the manifest's folder.

    Rows that cannot be used (a path escaping the folder, a missing file, an unknown label or split) are
    skipped with the row number and the reason, like bad files in a class folder.
    """
    import csv

    folder = path.parent.resolve()
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        if columns[:2] != ["path", "label"] or not set(columns) <= {"path", "label", "split"}:
            raise DatasetError(f"{path}: the manifest's header must be path,label[,split]; found {columns}")
        rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key} for row in reader]
    labels = sorted({row["label"] for row in rows if row["label"]})
    classes = list(classes) if classes else labels
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}:{number}"
        target = (folder / row["path"]).resolve()
        split = row.get("split") or None
        if not row["path"] or not target.is_relative_to(folder):
            skipped.append(
                Skipped(where, f"path {row['path']!r} points outside the manifest's folder; refused")
            )
        elif row["label"] not in classes:
            skipped.append(Skipped(where, f"label {row['label']!r} is not one of the classes {classes}"))
        elif split is not None and split not in SPLITS:
            skipped.append(Skipped(where, f"split {split!r} is not one of {list(SPLITS)}"))
        elif not target.is_file():
            skipped.append(Skipped(where, f"file {row['path']} does not exist"))
        else:
            try:
                _, mode, size = read_header(target)
            except ImageRejected as error:
                skipped.append(Skipped(str(target), str(error)))
                continue
            samples.append(Sample(str(target), classes.index(row["label"]), split, size, mode))
    if not samples:
        raise DatasetError(
            f"{path}: no usable rows ({len(skipped)} skipped); see the reasons in skipped.json"
        )
    return ImageDataset(path, classes, samples, skipped)


def scan_dataset(path: Path, classes: list[str] | None = None) -> ImageDataset:
    """Find every labelled image under `path` (reading headers only); bad files go to `skipped`."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"data.path {path} does not exist; point it at a folder of class sub-folders or a .npz"
        )
    if path.is_file():
        if path.suffix == ".npz":
            return _scan_npz(path, classes)
        if path.suffix == ".csv":
            return _scan_manifest(path, classes)
        raise DatasetError(
            f"data.path {path} is a file but not a .npz or .csv manifest; point it at a folder, "
            "a .npz or a .csv"
        )
    return _scan_folders(path, classes)


def scan_images(path: Path) -> ImageDataset:
    """Unlabelled images to annotate: one image file, or every image under a folder (recursively). Headers
    only; files that are not usable images go to `skipped` with the reason, as for labelled data."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"{path} does not exist; point vision_api.input (or data.path) at images or a folder"
        )
    if path.is_file():
        samples, skipped = [], []
        try:
            fmt, mode, size = read_header(path)
            samples.append(Sample(str(path), -1, None, size, mode))
        except ImageRejected as error:
            skipped.append(Skipped(str(path), str(error)))
    else:
        samples, skipped = _scan_class_folder(path, -1, None)
    if not samples:
        raise DatasetError(
            f"{path}: no usable images ({len(skipped)} file(s) skipped); add JPEG/PNG files or fix the path"
        )
    return ImageDataset(path, [], samples, skipped)


def stratified_sample(dataset: ImageDataset, limit: int, seed: int) -> list[Sample]:
    """Up to `limit` samples, the same share of each class."""
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in dataset.samples:
        by_class.setdefault(sample.label, []).append(sample)
    share = min(1.0, limit / max(1, len(dataset.samples)))
    per_class = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: s.ref)
        rng.shuffle(group)
        per_class.append(group[: max(2, round(len(group) * share))])
    chosen = [sample for group in per_class for sample in group]
    if len(chosen) <= limit:
        return chosen
    # Over the limit (the two-per-class floor, many classes): take the classes in turn, so none is left out.
    interleaved = [group[i] for i in range(max(map(len, per_class))) for group in per_class if i < len(group)]
    return interleaved[:limit]


def _stratified_take(
    samples: list[Sample], fraction: float, rng: random.Random, groups: dict | None = None
) -> tuple[list, list]:
    """Split off about `fraction` of each class (at least one image when the class has two or more).

    Images in one duplicate group (`groups`: ref -> group, exact or near copies) move together, so that no
    copy ends up on both sides; a group counts for the class most of its images have.
    """
    groups = groups or {}
    units: dict[object, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: s.ref):
        units[groups.get(sample.ref, sample.ref)].append(sample)
    by_label: dict[int, list[list[Sample]]] = defaultdict(list)
    for members in units.values():
        label = Counter(s.label for s in members).most_common(1)[0][0]
        by_label[label].append(members)
    taken, rest = [], []
    for label in sorted(by_label):
        class_units = by_label[label]
        rng.shuffle(class_units)
        images = sum(len(members) for members in class_units)
        k = max(1, round(images * fraction)) if images >= 2 else 0
        count = 0
        for members in class_units:
            if count < k:
                taken += members
                count += len(members)
            else:
                rest += members
    return taken, rest


def held_out_split_given(dataset: ImageDataset) -> bool:
    """Whether the data brings its own held-out split (test, or val used as test) that `assign_splits` keeps."""
    present = {sample.split for sample in dataset.samples}
    return "train" in present and bool(present & {"val", "test"})


def assign_splits(
    dataset: ImageDataset, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
):
    """Give every sample a train/val/test role, deterministically for a seed.

    Given train/val/test are kept. Given train/test: val is carved from train. Given train/val only: val becomes
    the held-out test split and a val split is carved from train, so the reported figure is never the one early
    stopping chose on. Otherwise a stratified 70/15/15. The splits visionroute makes keep each duplicate group
    (`duplicate_groups`, from validation) in one split; a split the user gave is kept as given (leakage
    across it is reported by validation's `check_leakage`).
    """
    rng = random.Random(seed)
    groups = dataset.duplicate_groups
    present = {sample.split for sample in dataset.samples}
    if {"train", "val", "test"} <= present:
        return dataset
    train = [s for s in dataset.samples if s.split == "train"]
    if "train" in present and "test" in present:
        tests = [s for s in dataset.samples if s.split == "test"]
        val, train = _stratified_take(train, val_fraction, rng, groups)
    elif "train" in present and "val" in present:
        tests = [replace(s, split="test") for s in dataset.samples if s.split == "val"]
        val, train = _stratified_take(train, val_fraction, rng, groups)
    else:
        pool = list(dataset.samples)
        tests, pool = _stratified_take(pool, test_fraction, rng, groups)
        val, train = _stratified_take(pool, val_fraction / (1 - test_fraction), rng, groups)
        tests = [replace(s, split="test") for s in tests]
    samples = [replace(s, split="train") for s in train] + [replace(s, split="val") for s in val] + tests
    return replace(dataset, samples=samples)


def decode_all(dataset: ImageDataset, transform, workers: int = 2, progress: bool = True):
    """Decode each image once and apply `transform` (e.g. resize); returns ({ref: result}, {ref: reason}).

    Threads, because PIL releases the GIL while decoding and resizing.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def work(sample: Sample):
        try:
            return sample.ref, transform(dataset.load(sample)), None
        except ImageRejected as error:
            return sample.ref, None, str(error)

    results, rejected = {}, {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        iterator = pool.map(work, dataset.samples)
        for ref, value, reason in tqdm(
            iterator, total=len(dataset.samples), desc="decode", unit="img", disable=not progress, leave=False
        ):
            if reason is None:
                results[ref] = value
            else:
                rejected[ref] = reason
    _release_decoder_memory()
    return results, rejected


def _release_decoder_memory() -> None:
    """Hand freed decode buffers back to the OS: glibc keeps them in per-thread arenas otherwise."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(libc).malloc_trim(0)
