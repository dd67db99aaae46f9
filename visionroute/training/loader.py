"""Batches of stored uint8 squares, fed to the device while the previous step computes.

Two ways in, chosen by size: a split that fits comfortably in GPU memory is copied there once and batches are
gathered on the GPU (no host traffic per step, as airbench does for CIFAR); anything else streams from its
memory-mapped cache file through a background thread that gathers each batch (indices sorted, so reads are
near-sequential), pins it and hands it over for a non-blocking copy.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from visionroute.training.cache import SplitArrays

GPU_RESIDENT_FRACTION = 0.3
"""A split is held on the GPU when it needs at most this share of the GPU's free memory."""


class BatchFeed:
    """`batch_size` is the global batch: under data parallelism each of `world` ranks takes every world-th
    image of it, so that N processes step exactly as one process with the whole batch would."""

    def __init__(
        self,
        split: SplitArrays,
        batch_size: int,
        device: torch.device,
        prefetch: int = 3,
        rank: int = 0,
        world: int = 1,
    ):
        self.split, self.batch_size, self.device, self.prefetch = split, batch_size, device, prefetch
        self.rank, self.world = rank, world
        self.labels = torch.from_numpy(np.asarray(split.y, dtype=np.int64))
        self.resident: torch.Tensor | None = None
        if (
            device.type == "cuda"
            and split.x.nbytes <= GPU_RESIDENT_FRACTION * torch.cuda.mem_get_info(device)[0]
        ):
            self.resident = torch.empty(split.x.shape, dtype=torch.uint8, device=device)
            for start in range(
                0, len(split.x), 4096
            ):  # in chunks: the memory map is never read whole into RAM
                chunk = np.array(split.x[start : start + 4096])
                self.resident[start : start + len(chunk)].copy_(torch.from_numpy(chunk))
            self.labels = self.labels.to(device)

    def __len__(self) -> int:
        return len(self.split)

    def steps(self) -> int:
        """Batches per epoch. A trailing partial batch is dropped on a GPU (a new shape makes cuDNN autotune
        again mid-epoch: measured 0.31 of raw speed with it, 0.94 without, resnet50 on an H200; the order is
        reshuffled each epoch, so every image is still seen) and anywhere when it holds one image (BatchNorm
        cannot train on it). Under data parallelism it is kept only when it is the only batch (fewer images than
        the global batch: every rank still trains) and gives each rank at least two images."""
        full, rest = divmod(len(self.split), self.batch_size)
        if self.world > 1:
            keep_rest = full == 0 and rest >= 2 * self.world
        else:
            keep_rest = rest > 1 and (self.device.type != "cuda" or full == 0)
        return full + (1 if keep_rest else 0)

    def rank_batch(self) -> int:
        """Images of a full batch that this rank trains on."""
        return len(range(self.rank, self.batch_size, self.world))

    def epoch(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) on the device, in `order` (a permutation of the split's indices)."""
        if self.resident is not None:
            # One copy of the order per epoch: a pageable copy per batch would synchronise every step.
            order = order.to(self.device)
        batches = [
            order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]
            for i in range(self.steps())
        ]
        if self.resident is not None:
            for ids in batches:
                yield self.resident.index_select(0, ids), self.labels.index_select(0, ids)
            return
        yield from self._stream(batches)

    def _stream(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        pin = self.device.type == "cuda"

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for ids in batches:
                    ids = np.sort(ids.numpy())
                    x = torch.from_numpy(self.split.x[ids])
                    y = self.labels[torch.from_numpy(ids)]
                    if pin:
                        x, y = x.pin_memory(), y.pin_memory()
                    if not put((x, y)):
                        return
                put(None)
            except BaseException as error:  # surfaced in the consumer, not lost in the thread
                put(error)

        thread = threading.Thread(target=produce, name="batch-feed", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y = item
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        finally:
            stop.set()
            thread.join()


def batches_in_order(x: np.ndarray, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Evaluation: the split's stored squares in order, as uint8 batches on the device."""
    for start in range(0, len(x), batch_size):
        yield torch.from_numpy(np.array(x[start : start + batch_size])).to(device, non_blocking=True)
