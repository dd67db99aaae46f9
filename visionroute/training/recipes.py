"""The two training recipes as frozen configurations (in the spirit of timm's pretrained cfgs).

Both run the same engine; they differ only in these values. Read them side by side: that is the whole
difference between fine-tuning and training from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Augmentation:
    scale: tuple[float, float] = (0.25, 1.0)
    """Crop area as a fraction of the stored square."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: float = 0.2
    """Brightness, contrast and saturation factors drawn from [1 - jitter, 1 + jitter]."""


@dataclass(frozen=True)
class Recipe:
    name: str
    pretrained: bool
    """Start from ImageNet (or a checkpoint's) weights; else random initialisation."""
    linear_probe: bool
    """Fit the head on frozen features before training the whole network (LP-FT)."""
    max_epochs: int
    """Upper bound; the budget and early stopping usually end training sooner."""
    optimizer: str
    lr_head: float
    lr_backbone: float
    weight_decay: float
    label_smoothing: float
    warmup_epochs: float
    patience: int | None
    """Epochs without a better validation accuracy before stopping; None: no early stop."""
    augmentation: Augmentation = field(default_factory=Augmentation)
    class_weighted_above: float | None = None
    """Largest/smallest class ratio above which the loss is weighted by inverse class frequency."""
    choose_threshold: bool = False
    """Two classes: decision threshold chosen on validation (balanced accuracy), recorded with the model; the
    best epoch is then chosen by validation AUC (what the threshold is chosen from), not argmax accuracy."""
    average_epochs: float | None = None
    """Validate, select and register an exponential moving average of the weights over about this many
    epochs instead of the last step's weights."""
    frozen_fraction: float = 0.0
    """Small data (pretrained, under `TrainConfig.freeze_bn_below` images): the first this fraction of the
    backbone's parameter tensors stays at its pretrained values. Backpropagation then stops at the first trained
    layer, and early layers hold most of a CNN's compute but few of its parameters."""


FINETUNE = Recipe(
    name="finetune",
    pretrained=True,
    linear_probe=True,
    max_epochs=8,
    optimizer="adamw",
    lr_head=1e-3,
    lr_backbone=1e-4,  # 10x lower: pretrained features need only small changes
    weight_decay=0.05,
    label_smoothing=0.1,
    warmup_epochs=1.0,
    patience=3,
    augmentation=Augmentation(scale=(0.25, 1.0)),
    # Half the parameter tensors of lite2 frozen on ants/bees (2 cores): an epoch in 15-16 s instead of 33, held
    # out 0.967 against 0.961 for the whole network (bench/RESULTS.md): two epochs fit where one did.
    frozen_fraction=0.5,
)

IMBALANCE_WEIGHTING_RATIO = 3.0
"""Above 3:1 between the largest and smallest class, scratch training weights the loss by default: a model
trained from random weights on 9:1 data (PneumoniaMNIST's train split) otherwise learns the majority class."""

SCRATCH = Recipe(
    name="scratch",
    pretrained=False,
    linear_probe=False,
    max_epochs=60,
    optimizer="adamw",
    lr_head=2e-3,  # one learning rate for every layer: nothing pretrained to protect
    lr_backbone=2e-3,
    weight_decay=0.05,
    label_smoothing=0.1,
    warmup_epochs=2.0,
    # No early stop: the schedule ends the run. The averaged weights keep improving until the decay is over;
    # on PneumoniaMNIST (H200, seeds 0-4) stopping after 12 epochs without a better validation AUC ended runs
    # mid-decay (test accuracy 0.881-0.931, 2 of 5 at >= 0.90) where finishing it gave 0.880-0.936, 4 of 5.
    patience=None,
    # Crops of 70-100% of the image: on PneumoniaMNIST (28 px) 0.35-1 lost detail (test 0.853, AUC 0.942) and
    # no cropping overfitted (0.843, 0.854); 0.7-1 gave 0.912 / 0.960 (bench/RESULTS.md, H200).
    augmentation=Augmentation(scale=(0.7, 1.0), jitter=0.2),
    class_weighted_above=IMBALANCE_WEIGHTING_RATIO,
    choose_threshold=True,
    # From random weights at a high learning rate the last step's weights are noisy: on PneumoniaMNIST (H200)
    # their validation accuracy swung 0.55-0.96 between epochs and early stopping once kept epoch 4.
    average_epochs=1.0,
)

RECIPES = {recipe.name: recipe for recipe in (FINETUNE, SCRATCH)}
