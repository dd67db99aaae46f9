"""One training step (forward, loss, backward, optimizer step), run eagerly or replayed from a CUDA graph.

A step of a small-input CNN on a GPU is a few milliseconds of GPU work spread over several hundred kernels.
Launching them costs the host about as long as the GPU takes to run them, so the host sets the pace, and on
the lent H100/H200 machines the host's jitter moved the rate of the same loop by up to a third. A CUDA graph
captures the step's kernels once and replays them with a single launch (PyTorch's "whole network capture").
Only the batch is copied into the graph's input and the learning rate into its tensor before each replay.

`make_step` picks the graph where it is safe and pays: one GPU (no DDP hooks), small inputs, fused AdamW (its
state starts at zero, which the warm-up can put back), no torch.compile. Everything else steps eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

GRAPHED_INPUT_MAX = 64
"""Inputs up to this size are launch-bound on a GPU (28 px: about 8 ms of GPU work per step of 512); at
224 px a step is compute-bound and a graph would buy little for its memory."""

WARMUP_PASSES = 3
"""Eager passes before the capture, as PyTorch's capture recipe asks: cuDNN picks its algorithms and the
allocator and the optimizer create what they need outside the graph."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EagerStep:
    graphed = False

    def __init__(self, model: nn.Module, optimiser: torch.optim.Optimizer, loss_fn: LossFn):
        self.model, self.optimiser, self.loss_fn = model, optimiser, loss_fn
        for group in optimiser.param_groups:
            if group.get("capturable"):  # a GraphedStep whose capture failed hands its optimizer over
                group["capturable"] = False

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, lr_factor: float) -> torch.Tensor:
        """Trains on one batch at `lr_factor` times each group's base learning rate; returns the loss."""
        for group in self.optimiser.param_groups:
            group["lr"] = group["base_lr"] * lr_factor
        loss = self.loss_fn(x, labels)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return loss.detach()


class GraphedStep:
    """The same step, captured into a CUDA graph at the first call and replayed after. The warm-up before the
    capture changes nothing: it runs at learning rate 0, and BatchNorm statistics and the optimizer's state
    are put back, so a graphed run trains as the eager one would. A batch of another shape than the first
    (none on a GPU, which drops a trailing partial batch) steps eagerly on the graph's own gradients. A step that
    cannot be captured (a model that reads a value back to the host, say) trains eagerly and says so."""

    def __init__(
        self, model: nn.Module, optimiser: torch.optim.Optimizer, loss_fn: LossFn, device: torch.device
    ):
        self.model, self.optimiser, self.loss_fn, self.device = model, optimiser, loss_fn, device
        for group in optimiser.param_groups:
            # Read by the captured kernels from device memory, so that each replay sees the new value.
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
            group["capturable"] = True
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fallback: EagerStep | None = None

    @property
    def graphed(self) -> bool:
        return self.graph is not None and self.fallback is None

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, lr_factor: float) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback(x, labels, lr_factor)
        for group in self.optimiser.param_groups:
            group["lr"].fill_(group["base_lr"] * lr_factor)
        if self.graph is None:
            try:
                self._capture(x, labels)
            except RuntimeError as error:
                self._fall_back(error)
                return self.fallback(x, labels, lr_factor)
        if x.shape != self.x.shape or labels.shape != self.labels.shape:
            return self._eager(x, labels)
        self.x.copy_(x)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.loss.detach().clone()  # the graph overwrites its loss at the next replay

    def _capture(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.x, self.labels = x.clone(), labels.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        warm_up_leaving_no_trace(
            self.model, self.optimiser, self.loss_fn, self.x, self.labels, torch.cuda.stream(side)
        )
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.optimiser.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a streaming feed's reader thread pins host memory meanwhile, which is safe.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.loss = self.loss_fn(self.x, self.labels)
            self.loss.backward()
            self.optimiser.step()

    def _fall_back(self, error: RuntimeError) -> None:
        """Eager from here on. The capture ran nothing, and the warm-up had put everything back."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.graph = None
        self.optimiser.zero_grad(set_to_none=True)  # gradients from the graph's pool
        for group in self.optimiser.param_groups:
            group["lr"] = float(group["lr"])
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"the training step could not be captured as a CUDA graph ({first_line}); training eagerly",
            flush=True,
        )
        self.fallback = EagerStep(self.model, self.optimiser, self.loss_fn)

    def _eager(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(x, labels)
        self.optimiser.zero_grad(set_to_none=False)  # the graph's gradient tensors stay where it wrote them
        loss.backward()
        self.optimiser.step()
        return loss.detach()


def warm_up_leaving_no_trace(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    loss_fn: LossFn,
    x: torch.Tensor,
    labels: torch.Tensor,
    where: contextlib.AbstractContextManager | None = None,
) -> None:
    """`WARMUP_PASSES` training passes on (x, labels) (in `where`: a side stream for a capture) that leave the
    weights, BatchNorm statistics, optimizer state and learning rates (tensors) as they found them: they run
    at learning rate 0 (AdamW then moves no weight) and what they changed is put back."""
    # All of it in `where`: on a side stream, a snapshot or restore on another stream would race the passes.
    with where or contextlib.nullcontext(), warnings.catch_warnings(), torch.no_grad():
        rates = [group["lr"].clone() for group in optimiser.param_groups]
        buffers = [buffer.detach().clone() for buffer in model.buffers()]
        state = {
            id(parameter): {key: value.clone() for key, value in values.items()}
            for parameter, values in optimiser.state.items()
        }
        for group in optimiser.param_groups:
            group["lr"].zero_()
        warnings.filterwarnings("ignore", message=".*capturable=True.*")  # uncaptured on purpose
        for _ in range(WARMUP_PASSES):
            optimiser.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_fn(x, labels).backward()
            optimiser.step()
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
        for parameter, values in optimiser.state.items():
            saved = state.get(id(parameter))
            for key, value in values.items():
                if saved:
                    value.copy_(saved[key])
                else:
                    value.zero_()  # AdamW's state starts at zero, its step count too
        for group, rate in zip(optimiser.param_groups, rates, strict=True):
            group["lr"].copy_(rate)


def graphable(device: torch.device, input_size: int, optimizer: str, processes: int, compiled: bool) -> bool:
    return (
        device.type == "cuda"
        and input_size <= GRAPHED_INPUT_MAX
        and optimizer == "adamw"
        and processes == 1
        and not compiled
    )


def make_step(
    model: nn.Module, optimiser: torch.optim.Optimizer, loss_fn: LossFn, device: torch.device, graphed: bool
) -> EagerStep | GraphedStep:
    if graphed:
        return GraphedStep(model, optimiser, loss_fn, device)
    return EagerStep(model, optimiser, loss_fn)
