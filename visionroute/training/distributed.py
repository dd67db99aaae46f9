"""Data-parallel training under torchrun: which process this is, and the few collective steps the engine needs.

torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE; `setup()` joins the process
group (NCCL on GPUs, gloo on CPUs). Every rank trains; rank 0 alone logs to MLflow, writes checkpoints and
registers the model. Decisions that must agree (stop now, how many epochs remain) are taken on rank 0 and
broadcast, so that no rank waits in a collective the others have left.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def processes_for(route: str, requested: int | str, gpus: int) -> int:
    """Training processes for a run: `auto` gives the scratch route one per visible GPU (large data, long
    training: it pays) and everything else one; a number is taken as it is, up to one per GPU on a GPU
    machine (several CPU processes share the cores through gloo: for tests and trials)."""
    if requested == "auto":
        return max(1, gpus) if route == "scratch" else 1
    if gpus and int(requested) > gpus:
        raise ValueError(
            f"training.processes is {requested} but {gpus} GPU(s) are visible; set it to {gpus} or auto"
        )
    return int(requested)


def multi_node() -> bool:
    """`visionroute train --nnodes N` (N > 1) set torchrun's own settings for this process."""
    return os.environ.get("PET_NNODES", "1") != "1"


def under_torchrun() -> bool:
    """This process is one of torchrun's ranks (it must not start torchrun again)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return (
        dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))
    )


def is_main() -> bool:
    return rank() == 0


def setup() -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # Validation and decoding run on every rank before the first collective: allow them time.
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_ints(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's values on every rank."""
    if world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def mean(value: float, device: torch.device) -> float:
    """The mean of `value` over ranks."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / world_size()
