"""Training augmentation for a whole batch at once, on the device the model trains on.

Batches arrive as stored uint8 squares; one affine grid per image does the random-resized crop (area scale and
aspect ratio as timm's RandomResizedCrop), the horizontal flip and the resize to the model's input in a single
`grid_sample`, then brightness, contrast and saturation jitter and normalisation follow as batched tensor ops. On
a GPU this costs a few kernels per batch instead of a CPU-side PIL pipeline per image (what held the engine at
6-11% of the GPU's speed); on the CPU the same ops use every intra-op thread. Random draws come from the
caller's generator: on a GPU a CUDA one, so a step never waits on the host.

Small inputs on a GPU are augmented several batches at a time (`augmented`): a 28 px step is a few
milliseconds of GPU work, and launching the augmentation's two dozen small kernels for every batch was a
measurable share of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from visionroute.training.preprocessing import Preprocessing
from visionroute.training.recipes import Augmentation


def augment_batch(
    stored: torch.Tensor, prep: Preprocessing, aug: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """Normalised N x C x input x input float batch from stored uint8 squares, randomly cropped and jittered."""
    n, device = stored.shape[0], stored.device
    # Drawn where `generator` lives: a CUDA generator keeps the whole step on the GPU (no host work, no
    # host-to-device copy per batch); a CPU one makes CPU runs reproducible.
    draw = {"device": generator.device, "generator": generator}
    area = torch.empty(n, device=generator.device).uniform_(*aug.scale, generator=generator)
    aspect = (
        torch.empty(n, device=generator.device)
        .uniform_(math.log(aug.ratio[0]), math.log(aug.ratio[1]), generator=generator)
        .exp()
    )
    # Crop width/height as fractions of the square; clamp so the crop stays inside it.
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (torch.rand(n, **draw) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(n, **draw) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n, **draw) < aug.hflip, -1.0, 1.0)
    zero = torch.zeros_like(width)
    theta = torch.stack(
        [torch.stack([width * flip, zero, centre_x], 1), torch.stack([zero, height, centre_y], 1)], 1
    )
    factors = None
    if aug.jitter > 0:
        factors = torch.empty(n, 3, device=generator.device).uniform_(
            1 - aug.jitter, 1 + aug.jitter, generator=generator
        )

    size = prep.input_size
    grid = F.affine_grid(_to(theta, device), [n, stored.shape[1], size, size], align_corners=False)
    x = F.grid_sample(stored.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if factors is not None:
        factors = _to(factors, device).view(n, 3, 1, 1)
        brightness, contrast, saturation = factors[:, 0:1], factors[:, 1:2], factors[:, 2:3]
        x = x * brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        if x.shape[1] == 3:
            grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            x = (x - grey) * saturation + grey
        x = x.clamp(0, 255)
    return prep.normalise(x)


AHEAD_BYTES = 64 * 2**20
"""On a GPU, batches are augmented together up to this much float output (and at most `AHEAD_STEPS`):
sixteen 28 px batches of 512 take 26 MB, while a single 224 px batch of 256 (154 MB) goes alone."""
AHEAD_STEPS = 16


def steps_together(device: torch.device, batch_images: int, channels: int, input_size: int) -> int:
    """How many batches `augmented` augments in one pass: one on a CPU, where augmentation is arithmetic,
    not launches, and doing it ahead would only make steps uneven."""
    if device.type != "cuda":
        return 1
    batch_bytes = batch_images * channels * input_size * input_size * 4
    return max(1, min(AHEAD_STEPS, AHEAD_BYTES // max(1, batch_bytes)))


def augmented(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    prep: Preprocessing,
    aug: Augmentation,
    generator: torch.Generator,
    together: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(augmented images, labels) per batch of `batches`, `together` batches augmented in one pass. Each image
    gets its own random draws either way, so only the order of the draws depends on `together`."""
    batches = iter(batches)
    while group := [batch for _, batch in zip(range(together), batches, strict=False)]:
        stored = group[0][0] if len(group) == 1 else torch.cat([images for images, _ in group])
        pieces = augment_batch(stored, prep, aug, generator).split([len(labels) for _, labels in group])
        yield from zip(pieces, (labels for _, labels in group), strict=True)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To the batch's device; from the host through pinned memory, so the stream is not synchronised."""
    if tensor.device == device:
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
