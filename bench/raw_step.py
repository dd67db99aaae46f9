"""The raw training loop CPU benches compare against: forward, loss, backward and optimiser step on tensors
already in place, nothing else. Imported by bench/finetune.py and bench/cpu_rates.py."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def median_step_rate(model, optimiser, x: torch.Tensor, y: torch.Tensor, steps: int, bf16: bool) -> float:
    """Images/s of the median of `steps` timed steps, after one untimed step that pays one-off set-up. The
    median, because single steps on a shared machine occasionally stall 10x."""
    rates = []
    for step in range(steps + 1):
        started = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step:
            rates.append(len(x) / (time.perf_counter() - started))
    return statistics.median(rates)
