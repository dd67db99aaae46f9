"""Decode once, to disk: one memory-mapped uint8 array per split, reused across epochs and runs.

Each image is decoded and shrunk to its stored square (`Preprocessing.to_stored`) exactly once; training reads
batches from the arrays through the page cache, so memory stays bounded whatever the dataset size (200,000
images at 256 px is 39 GB on disk, a few hundred MB resident). The cache is keyed by the dataset's content (each
file's path, size and modification time; an .npz's bytes), the split assignment and the preprocessing: the same
data and model shape reuse it, anything else builds a new one. It is built in worker processes (decoding holds
the GIL for the per-file Python work), written to a temporary folder and renamed into place, so a crash never
leaves a half-written cache that a later run would trust.

The cache folder is kept to a size (VISIONROUTE_CACHE_MAX_GB, default 50): after each use the least recently
used entries beyond it are deleted, never the one in use (a run that still maps a deleted entry keeps reading it:
Linux frees the files when they are unmapped). Staging folders left by killed builds are deleted too.
`visionroute cache` lists the entries; `visionroute cache --max-gb N` prunes to N.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from visionroute.data.dataset import SPLITS, ImageDataset, Sample
from visionroute.data.images import ImageRejected
from visionroute.processes import alive
from visionroute.training.preprocessing import Preprocessing

DEFAULT_MAX_GB = 50.0

CACHE_VERSION = 1
"""Bump when the stored format or `to_stored` changes: old caches are then never read."""


@dataclass
class SplitArrays:
    """One split: stored uint8 squares (N x C x S x S, usually a read-only memory map), labels and refs."""

    x: np.ndarray
    y: np.ndarray
    refs: list[str]

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DecodedData:
    preprocessing: Preprocessing
    splits: dict[str, SplitArrays]
    rejected: dict[str, str] = field(default_factory=dict)
    """ref -> reason, for files that failed to decode."""
    folder: Path | None = None
    reused: bool = False
    build_seconds: float = 0.0

    @property
    def train(self) -> SplitArrays:
        return self.splits["train"]

    @property
    def val(self) -> SplitArrays:
        return self.splits["val"]

    @property
    def test(self) -> SplitArrays:
        return self.splits["test"]


def cache_key(dataset: ImageDataset, prep: Preprocessing) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, prep.store_side, prep.channels]).encode())
    npz_digest = ""
    if dataset.root.is_file() and dataset.root.suffix == ".npz":
        with open(dataset.root, "rb") as handle:
            npz_digest = hashlib.file_digest(handle, "sha256").hexdigest()
    for sample in dataset.samples:
        if sample.ref.startswith("npz:"):
            stamp = npz_digest
        else:
            stat = os.stat(sample.ref)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{sample.split}\0{sample.label}\0{sample.ref}\0{stamp}\n".encode())
    return digest.hexdigest()[:24]


def decode_to_cache(
    dataset: ImageDataset, prep: Preprocessing, root: Path | None, workers: int = 2, progress: bool = True
) -> DecodedData:
    """The dataset's train/val/test splits as stored uint8 arrays, from `root`'s cache when present.

    With `root` None the arrays are built in memory (small data, tests, benchmarks that must not write).
    """
    started = time.perf_counter()
    folder = root / cache_key(dataset, prep) if root else None
    if root is not None:
        remove_stale_staging(root)
    if folder and (folder / "meta.json").exists():
        try:
            _used(folder)  # marked before it is read, so that another run's prune passes it by
            data = _open(folder, prep)
            data.reused, data.build_seconds = True, time.perf_counter() - started
            return data
        except FileNotFoundError:  # pruned by another run a moment ago: build it again
            pass
    if folder is None:
        data = _build_in_memory(dataset, prep, workers, progress)
    else:
        staging = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            _build_on_disk(dataset, prep, staging, workers, progress)
            try:
                staging.rename(folder)
            except OSError:  # another process finished the same cache first: theirs is as good
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        data = _open(folder, prep)
        _used(folder)
    data.build_seconds = time.perf_counter() - started
    return data


@dataclass
class CacheEntry:
    folder: Path
    bytes: int
    last_used: float
    """Seconds since the epoch: the last run that built or reused it."""
    images: int


def cache_entries(root: Path) -> list[CacheEntry]:
    """The finished entries under `root`, least recently used first."""
    entries = []
    for folder in root.glob("*/meta.json"):
        folder = folder.parent
        if ".tmp-" in folder.name:
            continue
        try:
            meta = json.loads((folder / "meta.json").read_text())
            size = sum(path.stat().st_size for path in folder.iterdir())
            used = (folder / "meta.json").stat().st_mtime
        except (OSError, ValueError):  # removed meanwhile by another process's prune
            continue
        images = sum(len(split["refs"]) for split in meta["splits"].values())
        entries.append(CacheEntry(folder, size, used, images))
    return sorted(entries, key=lambda entry: entry.last_used)


def prune(root: Path, max_bytes: float, keep: Path | None = None) -> list[CacheEntry]:
    """Delete least recently used entries until the rest fit in `max_bytes`; `keep` (in use) stays."""
    entries = cache_entries(root)
    total = sum(entry.bytes for entry in entries)
    removed = []
    for entry in entries:
        if total <= max_bytes:
            break
        if keep is not None and entry.folder == keep:
            continue
        shutil.rmtree(entry.folder, ignore_errors=True)
        total -= entry.bytes
        removed.append(entry)
    return removed


def max_cache_bytes() -> float:
    value = os.environ.get("VISIONROUTE_CACHE_MAX_GB", str(DEFAULT_MAX_GB))
    try:
        gigabytes = float(value)
    except ValueError:
        raise ValueError(
            f"VISIONROUTE_CACHE_MAX_GB={value!r} is not a number of gigabytes, e.g. 50"
        ) from None
    return gigabytes * 1024**3


def remove_stale_staging(root: Path) -> None:
    """Staging folders whose building process on this host is gone (killed mid-build): never renamed into
    place, never read. Another host's (a shared state folder) are left to that host."""
    host = socket.gethostname()
    for staging in root.glob("*.tmp-*"):
        owner, _, pid = staging.name.rsplit(".tmp-", 1)[1].rpartition("-")
        if owner == host and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _used(folder: Path) -> None:
    """Mark the entry as used now, then keep the cache within its size."""
    os.utime(folder / "meta.json")
    prune(folder.parent, max_cache_bytes(), keep=folder)


def _open(folder: Path, prep: Preprocessing) -> DecodedData:
    meta = json.loads((folder / "meta.json").read_text())
    side, channels = meta["side"], meta["channels"]
    splits = {}
    for split in SPLITS:
        entry = meta["splits"][split]
        count = len(entry["refs"])
        x = (
            np.memmap(folder / f"{split}.u8", dtype=np.uint8, mode="r", shape=(count, channels, side, side))
            if count
            else np.zeros((0, channels, side, side), dtype=np.uint8)
        )
        splits[split] = SplitArrays(x, np.asarray(entry["labels"], dtype=np.int64), entry["refs"])
    return DecodedData(prep, splits, meta["rejected"], folder)


def _npz_stored(dataset: ImageDataset, prep: Preprocessing, samples: list[Sample]) -> np.ndarray | None:
    """Vectorised path for MedMNIST-style arrays already at the stored size (no PIL per image)."""
    if not samples or not all(s.ref.startswith("npz:") for s in samples):
        return None
    rows = []
    for sample in samples:
        _, split, index = sample.ref.split(":")
        rows.append(dataset._arrays[f"{split}_images"][int(index)])
    images = np.stack(rows)
    if images.shape[1:3] != (prep.store_side, prep.store_side):
        return None
    if images.ndim == 3:
        images = images[:, None] if prep.channels == 1 else np.repeat(images[:, None], 3, axis=1)
    elif prep.channels == 1:
        return None  # colour arrays to grey: let PIL's conversion do it, as for files
    else:
        images = images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images, dtype=np.uint8)


# Worker state for the process pool: set once per worker by the initializer, not pickled per task.
_WORKER: dict = {}


def _init_worker(dataset: ImageDataset, prep: Preprocessing, folder: str | None) -> None:
    _WORKER.update(dataset=dataset, prep=prep, folder=folder, maps={})


def _decode_chunk(task: tuple[str, int, list[tuple[int, Sample]]]) -> tuple[list[int], dict[str, str]]:
    split, count, chunk = task
    dataset, prep = _WORKER["dataset"], _WORKER["prep"]
    side = prep.store_side
    if split not in _WORKER["maps"]:
        _WORKER["maps"][split] = np.memmap(
            Path(_WORKER["folder"]) / f"{split}.u8",
            dtype=np.uint8,
            mode="r+",
            shape=(count, prep.channels, side, side),
        )
    out = _WORKER["maps"][split]
    done, rejected = [], {}
    for index, sample in chunk:
        try:
            out[index] = prep.to_stored(dataset.load(sample))
            done.append(index)
        except ImageRejected as error:
            rejected[sample.ref] = str(error)
    out.flush()
    return done, rejected


def _build_on_disk(
    dataset: ImageDataset, prep: Preprocessing, folder: Path, workers: int, progress: bool
) -> None:
    side, channels = prep.store_side, prep.channels
    by_split = {split: dataset.split(split) for split in SPLITS}
    tasks = []
    for split, samples in by_split.items():
        shape = (len(samples), channels, side, side)
        if not samples:
            continue
        fast = _npz_stored(dataset, prep, samples)
        memmap = np.memmap(folder / f"{split}.u8", dtype=np.uint8, mode="w+", shape=shape)
        if fast is not None:
            memmap[:] = fast
            memmap.flush()
            continue
        del memmap
        indexed = list(enumerate(samples))
        tasks += [(split, len(samples), indexed[i : i + 64]) for i in range(0, len(indexed), 64)]
    rejected: dict[str, str] = {}
    total = sum(len(chunk) for _, _, chunk in tasks)
    if tasks:
        bar = tqdm(total=total, desc="decode to cache", unit="img", disable=not progress, leave=False)
        if workers > 1 and total >= 256:
            with get_context("fork").Pool(workers, _init_worker, (dataset, prep, str(folder))) as pool:
                for done, reasons in pool.imap_unordered(_decode_chunk, tasks):
                    rejected.update(reasons)
                    bar.update(len(done) + len(reasons))
        else:
            _init_worker(dataset, prep, str(folder))
            for task in tasks:
                _, reasons = _decode_chunk(task)
                rejected.update(reasons)
                bar.update(len(task[2]))
            _WORKER.clear()
        bar.close()
    meta = {"version": CACHE_VERSION, "side": side, "channels": channels, "rejected": rejected, "splits": {}}
    for split, samples in by_split.items():
        keep = [i for i, s in enumerate(samples) if s.ref not in rejected]
        if len(keep) != len(samples):
            _compact(folder / f"{split}.u8", len(samples), keep, (channels, side, side))
        meta["splits"][split] = {
            "refs": [samples[i].ref for i in keep],
            "labels": [samples[i].label for i in keep],
        }
    (folder / "meta.json").write_text(json.dumps(meta))


def _compact(path: Path, count: int, keep: list[int], shape: tuple[int, int, int]) -> None:
    """Drop rejected rows in place (rows only move towards the front), then truncate the file."""
    array = np.memmap(path, dtype=np.uint8, mode="r+", shape=(count, *shape))
    for new, old in enumerate(keep):
        if new != old:
            array[new] = array[old]
    array.flush()
    del array
    with open(path, "r+b") as handle:
        handle.truncate(len(keep) * int(np.prod(shape)))


def _build_in_memory(dataset: ImageDataset, prep: Preprocessing, workers: int, progress: bool) -> DecodedData:
    from concurrent.futures import ThreadPoolExecutor

    side, channels = prep.store_side, prep.channels
    rejected: dict[str, str] = {}
    splits = {}
    for split in SPLITS:
        samples = dataset.split(split)
        fast = _npz_stored(dataset, prep, samples)
        if fast is not None:
            splits[split] = SplitArrays(
                fast, np.asarray([s.label for s in samples], dtype=np.int64), [s.ref for s in samples]
            )
            continue

        def work(sample: Sample):
            try:
                return prep.to_stored(dataset.load(sample)), None
            except ImageRejected as error:
                return None, str(error)

        rows, kept = [], []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(work, samples)
            for sample, (array, reason) in tqdm(
                zip(samples, results, strict=True),
                total=len(samples),
                desc=f"decode {split}",
                unit="img",
                disable=not progress,
                leave=False,
            ):
                if reason is None:
                    rows.append(array)
                    kept.append(sample)
                else:
                    rejected[sample.ref] = reason
        x = np.stack(rows) if rows else np.zeros((0, channels, side, side), dtype=np.uint8)
        splits[split] = SplitArrays(
            x, np.asarray([s.label for s in kept], dtype=np.int64), [s.ref for s in kept]
        )
    return DecodedData(prep, splits, rejected)
