"""How an image becomes a model input, in two stages shared by training, evaluation and prediction.

1. `to_stored` (once per image, on the CPU, PIL): decode to the model's channels and shrink so the short side is
   `stored_size`, centre-cropped square. This is what the decoded cache holds, as uint8.
2. `eval_batch` (per batch, on the model's device, torch): centre-crop `crop_pct` of the stored square, resize to
   `input_size` if needed, normalise. Training uses `augment.py` on the same stored squares instead.

Small images are stored at their native size (a 28 px X-ray is not upscaled to 256 px on disk); a model that wants
a larger input gets it by interpolation on the device, 64x cheaper to store and to move.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh host-to-GPU copy per batch would synchronise the stream every step.
    return (
        torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255,
        torch.tensor(std, device=device).view(1, -1, 1, 1) * 255,
    )


@dataclass(frozen=True)
class Preprocessing:
    """Logged with the model (preprocessing.json) so that predictions and comparisons match training."""

    input_size: int
    """Square side the model sees."""
    resize: int
    """Short side an image is resized to before the centre crop (input_size / crop_pct)."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    model_name: str
    channels: int = 3
    """1 for greyscale data trained natively (timm in_chans=1), else 3."""
    stored_size: int = 0
    """Side of the uint8 square kept per image (the decoded cache); 0 means `resize` (older models)."""
    threshold: float = 0.5
    """Two classes: the second class is predicted when its probability reaches this (chosen on validation)."""

    @classmethod
    def for_model(
        cls, model: nn.Module, model_name: str, classes: list[str], channels: int = 3, native_size: int = 0
    ) -> Preprocessing:
        """From the model's timm data config; `native_size` (the data's typical short side) caps the stored
        size, so that images smaller than the model's resize are kept at their own resolution."""
        config = timm.data.resolve_data_config({}, model=model)
        size = config["input_size"][-1]
        resize = int(math.floor(size / config["crop_pct"]))
        mean, std = tuple(config["mean"]), tuple(config["std"])
        if channels == 1:
            # timm sums the first conv over RGB for in_chans=1: the grey input is normalised as their mean.
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        stored = min(resize, native_size) if native_size else resize
        return cls(size, resize, mean, std, list(classes), model_name, channels, stored)

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self) | {"stored_size": self.store_side}

    @property
    def store_side(self) -> int:
        return self.stored_size or self.resize

    def to_stored(self, image: Image.Image) -> np.ndarray:
        """C x S x S uint8 from a decoded RGB image: short side resized to S, centre-cropped."""
        side = self.store_side
        if self.channels == 1:
            image = image.convert("L")
        if image.size != (side, side):
            scale = side / min(image.size)
            width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
            if (width, height) != image.size:
                image = image.resize((width, height), Image.BICUBIC, reducing_gap=3.0)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        array = np.array(image, dtype=np.uint8)  # a copy: writable, so torch can wrap it
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) N x C x H x W to the model's normalised float input."""
        mean, std = _constants(self.mean, self.std, batch.device)
        return (batch.float() - mean) / std

    def eval_batch(self, stored: torch.Tensor) -> torch.Tensor:
        """Normalised N x C x input x input from stored uint8 squares: centre crop, then resize if needed."""
        side = stored.shape[-1]
        crop = max(1, round(side * self.input_size / self.resize))
        top = (side - crop) // 2
        x = stored[..., top : top + crop, top : top + crop].float()
        if crop != self.input_size:
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                antialias=crop > self.input_size,
                align_corners=False,
            )
        return self.normalise(x)

    def eval_input(self, image: Image.Image) -> torch.Tensor:
        """One normalised 1 x C x S x S tensor, as at prediction time."""
        return self.eval_batch(torch.from_numpy(self.to_stored(image))[None])

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Class indices from logits: argmax, or the validation-chosen threshold for two classes."""
        if len(self.classes) == 2 and self.threshold != 0.5:
            return (logits.float().softmax(1)[:, 1] >= self.threshold).long()
        return logits.argmax(1)
