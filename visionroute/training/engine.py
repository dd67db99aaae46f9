"""The training engine both training routes share, as parts that can be tested alone.

    data      cache.decode_to_cache  each image decoded once, to a memory-mapped uint8 array per split
    feed      loader.BatchFeed       batches to the device (held on the GPU when they fit)
    augment   augment.augmented      crop/flip/jitter/normalise on the device (small inputs: batches at once)
    probe     fit_linear_probe       a head fitted on frozen features (fine-tune only: LP-FT, Kumar et al. 2022)
    loop      train_epoch            one pass over the training split, on the learning-rate schedule
    step      step.make_step         forward, loss, backward, fused optimizer step (small inputs on one GPU:
                                     replayed from a CUDA graph)
    average   WeightAverage          an EMA of the weights (scratch): what is validated, selected and kept
    select    ModelSelection         the best epoch by validation accuracy (AUC when a threshold is chosen)
    budget    BudgetPlanner          how many more epochs fit, from steady-state epoch time
    resume    Checkpoint             everything needed to continue after the process died

`train` puts them together, top to bottom. The two recipes (fine-tune, scratch) are frozen values in
`recipes.py`; `TrainConfig.from_recipe` turns one into this run's configuration.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from visionroute.data.dataset import DatasetError, ImageDataset
from visionroute.training import distributed
from visionroute.training.augment import augment_batch, augmented, steps_together
from visionroute.training.cache import DecodedData, decode_to_cache
from visionroute.training.catalogue import SMALL_INPUT_MAX, catalogue_entry
from visionroute.training.loader import BatchFeed, batches_in_order
from visionroute.training.metrics import binary_threshold, classification_report, roc_auc
from visionroute.training.preprocessing import Preprocessing
from visionroute.training.recipes import Augmentation, Recipe
from visionroute.training.step import EagerStep, GraphedStep, graphable, make_step

__all__ = ["Preprocessing", "TrainConfig", "TrainResult", "build_model", "prepare_data", "train", "evaluate"]


@dataclass
class TrainConfig:
    model_name: str
    pretrained: bool = True
    linear_probe: bool = True
    max_epochs: int = 8
    budget_seconds: float = 20 * 60
    batch_size: int | None = None
    """None: 8 on CPU (as fast as 16 on 2 cores, a third less memory); on GPU 256 (512 for small inputs),
    where the raw loop reaches its best rate (bench/gpu_train.py)."""
    optimizer: str = "adamw"
    """adamw | sgd (Nesterov momentum 0.9)."""
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    """Lower than the head's: pretrained features need only small changes."""
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    patience: int | None = 3
    """Epochs without a better validation accuracy before stopping; None: no early stop."""
    freeze_bn_below: int = 5000
    """With fewer training images (and pretrained weights), BatchNorm statistics stay at their pretrained values."""
    augmentation: Augmentation = field(default_factory=Augmentation)
    class_weighted_above: float | None = None
    """Weight the loss by inverse class frequency when the largest/smallest class ratio exceeds this."""
    choose_threshold: bool = False
    """Two classes: pick the decision threshold on validation (balanced accuracy) instead of argmax, and the
    best epoch by validation AUC."""
    average_epochs: float | None = None
    """Weights averaged (EMA) over about this many epochs are validated, selected and registered."""
    frozen_fraction: float = 0.0
    """Small pretrained runs: the first this fraction of the backbone's parameter tensors is not trained."""
    compile: bool = False
    """torch.compile the model on GPU (pays off on long runs; its compile time counts against the budget)."""
    cuda_graph: bool = True
    """Small inputs on one GPU: replay each training step from a CUDA graph (`step.py`), where launching its
    kernels one by one would set the pace."""
    seed: int = 0
    checkpoint_dir: Path | None = None
    """Where last.pt / best.pt go each epoch; a last.pt of the same run there is resumed from."""
    cache_dir: Path | None = None
    """Decoded-cache root; None decodes into memory."""
    decode_workers: int = 2
    resume_key: str = ""
    """Identifies the run (spec + data + config digest): a checkpoint with another key is not resumed."""

    @classmethod
    def from_recipe(cls, recipe: Recipe, model_name: str, **overrides) -> TrainConfig:
        values = {
            k: getattr(recipe, k)
            for k in (
                "pretrained",
                "linear_probe",
                "max_epochs",
                "optimizer",
                "lr_head",
                "lr_backbone",
                "weight_decay",
                "label_smoothing",
                "warmup_epochs",
                "patience",
                "augmentation",
                "class_weighted_above",
                "choose_threshold",
                "average_epochs",
                "frozen_fraction",
            )
        }
        return cls(model_name, **(values | overrides))


@dataclass
class TrainResult:
    model: nn.Module
    preprocessing: Preprocessing
    history: list[dict] = field(default_factory=list)
    probe: dict | None = None
    best_epoch: int = 0
    stopped: str = ""
    test: dict = field(default_factory=dict)
    seconds: float = 0.0
    train_images_per_s: float = 0.0
    """Steady state: images over training seconds, the device's warm-up steps excluded."""
    warmup_seconds: float = 0.0
    step_images_per_s: list[float] = field(default_factory=list)
    batch_size: int = 0
    device: str = "cpu"
    resumed_from_epoch: int = 0
    class_weights: list[float] | None = None
    cuda_graph: bool = False
    """Training steps were replayed from a CUDA graph (`TrainConfig.cuda_graph`)."""
    precision: str = "fp32"
    """bf16 (autocast) or fp32: see `precision()`."""
    frozen_tensors: int = 0
    """Backbone parameter tensors left at their pretrained values (`TrainConfig.frozen_fraction`)."""


STOPS = ("max_epochs", "early_stopping", "budget")
"""Why training ended (TrainResult.stopped)."""

AUC_TOLERANCE = 0.002
"""Validation AUCs closer than this are a tie, which the lower validation loss breaks."""

WARMUP_STEPS = {"cuda": 3, "cpu": 1}
"""Steps that pay one-off set-up (cuDNN autotuning, allocator growth, compilation): timed apart, and not
counted as the epoch's time by the budget planner (on a GPU they took 25 s of a 45 s budget)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """This process's device: under torchrun, the GPU of its local rank."""
    return distributed.device()


def default_batch_size(device: torch.device, prep: Preprocessing) -> int:
    if device.type != "cuda":
        # 28 px on 2 cores: 48 img/s at batch 8, 65 at 64 (resnet18_small); at 224+ px 8 is as fast as 16.
        return 64 if prep.input_size <= 64 else 8
    return 512 if prep.input_size <= 64 else 256


def build_model(
    model_name: str, num_classes: int, in_chans: int = 3, input_size: int | None = None
) -> nn.Module:
    """A timm model with random weights; pretrained ones are loaded by `weights.load_pretrained`.

    Small-input catalogue entries get a CIFAR-style stem (3x3 stride 1, no max-pool) and their data config
    says so: native input size, the whole image at evaluation.
    """
    entry = catalogue_entry(model_name)
    if not entry.small_input:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    model = timm.create_model(
        model_name.removesuffix("_small"), pretrained=False, num_classes=num_classes, in_chans=in_chans
    )
    width = model.conv1.out_channels
    model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    size = input_size or entry.input_size
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (in_chans, size, size), "crop_pct": 1.0}
    return model


def prepare_data(
    dataset: ImageDataset, prep: Preprocessing, workers: int = 2, cache_root: Path | None = None
) -> DecodedData:
    """Every image decoded once (to `cache_root` when given); bad files come back in `rejected`."""
    return decode_to_cache(dataset, prep, cache_root, workers=workers)


CPU_BF16_ENV = "VISIONROUTE_CPU_BF16"


def bf16_instructions() -> bool:
    """The CPU has bf16 matrix instructions: AMX-BF16 or AVX512-BF16."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # torch >= 2.10
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


@functools.cache
def cpu_bf16() -> bool:
    """bf16 autocast on this CPU: where it has bf16 matrix instructions, AMX-BF16 (Intel Xeon 4th generation
    and later) or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake). On 2 cores, against fp32: with AMX, a
    training step of tf_efficientnet_lite2 at 260 px ran 2.2x and evaluation 3-4x as fast (the engine's whole
    step, augmentation included: 1.3x); on an AMD EPYC with AVX512-BF16, the engine's step 1.4x and evaluation
    4.5-5x (bench/RESULTS.md, 2026-12-06 and 2026-12-07). Elsewhere fp32: without those instructions the gain
    is unmeasured or a loss.
    VISIONROUTE_CPU_BF16=0 keeps fp32 (=1 forces bf16)."""
    chosen = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if chosen in ("0", "1"):
        return chosen == "1"
    if chosen != "auto":
        raise ValueError(
            f"{CPU_BF16_ENV}={chosen!r}: use 0 (fp32), 1 (bf16) or auto (bf16 where the CPU has AMX-BF16 or "
            "AVX512-BF16)"
        )
    return bf16_instructions()


def training_device() -> str:
    """What the auto model choice plans for here (catalogue.TRAINING_DEVICES). bf16 forced on a CPU without
    bf16 instructions is not known to train faster: it is planned as fp32."""
    if pick_device().type == "cuda":
        return "gpu"
    return "cpu_bf16" if cpu_bf16() and bf16_instructions() else "cpu"


def precision(device: torch.device) -> str:
    """What the model computes in on `device`: bf16 on GPUs and on CPUs with bf16 instructions (`cpu_bf16`),
    else fp32 (logged with the run)."""
    return "bf16" if device.type == "cuda" or cpu_bf16() else "fp32"


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(device) == "bf16")


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    stored_x,
    prep: Preprocessing,
    device: torch.device,
    batch_size: int | None = None,
    features: bool = False,
) -> torch.Tensor:
    """Logits (or pooled pre-logit features) for stored uint8 squares, in eval mode."""
    # Small CPU batches: at 260 px one activation of a 64-image batch is ~800 MB, for no speed gain.
    batch_size = batch_size or (256 if device.type == "cuda" else 16)
    # A model loaded from the registry is a torch.export graph: already in eval mode, no .eval() to call.
    exported = isinstance(model, torch.fx.GraphModule)
    was_training = model.training
    if not exported:
        model.eval()
    outputs = []
    if isinstance(stored_x, torch.Tensor):
        stored_x = stored_x.numpy()
    for stored in batches_in_order(stored_x, batch_size, device):
        outputs.append(forward_eval(model, prep.eval_batch(stored), features).cpu())
    if not exported:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0)


@torch.no_grad()
def forward_eval(model: nn.Module, batch: torch.Tensor, features: bool = False) -> torch.Tensor:
    """float32 logits (or pooled pre-logit features) for a normalised batch, computed as evaluation and
    prediction both compute them, so that a registered model labels images as it was scored."""
    if batch.device.type == "cuda" or (
        precision(batch.device) == "bf16" and batch.shape[-1] > SMALL_INPUT_MAX
    ):
        # On a bf16 CPU too: a channels-last bf16 batch evaluated lite2 1.5-2x as fast as a contiguous one with
        # AMX, 1.2-2x with AVX512-BF16 (training is fastest contiguous there, so only the batch changes layout,
        # not the model); at 28 px channels-last was slower (AMX) or no faster (AVX512-BF16).
        batch = batch.contiguous(memory_format=torch.channels_last)
    with _autocast(batch.device):
        out = model.forward_head(model.forward_features(batch), pre_logits=True) if features else model(batch)
    return out.float()


def fit_linear_probe(train_f, train_y, val_f, val_y, num_classes: int) -> dict:
    """Multinomial logistic regression on frozen features, L2 strength chosen on validation accuracy.

    Ties go to the stronger L2: a less confident head sends smaller gradients into the backbone when
    fine-tuning starts from it.
    """
    best = None
    for l2 in (1e-1, 1e-2, 1e-3, 1e-4):
        torch.manual_seed(0)
        linear = nn.Linear(train_f.shape[1], num_classes)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        optimiser = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

        def closure(linear=linear, optimiser=optimiser, l2=l2):
            optimiser.zero_grad()
            loss = F.cross_entropy(linear(train_f), train_y) + l2 * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        optimiser.step(closure)
        with torch.no_grad():
            logits = linear(val_f)
            accuracy = (logits.argmax(1) == val_y).float().mean().item() if len(val_y) else 0.0
            loss = F.cross_entropy(logits, val_y).item() if len(val_y) else 0.0
        if best is None or accuracy > best["val_accuracy"]:
            best = {
                "l2": l2,
                "val_accuracy": accuracy,
                "val_loss": loss,
                "weight": linear.weight.detach().clone(),
                "bias": linear.bias.detach().clone(),
            }
    return best


def _set_bn_eval(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class ModelSelection:
    """Keeps the best epoch's weights by a validation score (accuracy, or AUC for a thresholded two-class model).

    Scores within `tolerance` are noise: accuracies one validation image apart on a small split (one image of
    36 is 2.8 points); there, the lower loss wins. Measured on the demo's ants/bees: a first epoch at 36/36 ahead
    of later ones at 35/36 with lower loss held out 0.91. A probed model is epoch 0: fine-tuning must match its
    accuracy to replace it; its loss is no tie-break (label smoothing inflates fine-tuned losses).
    """

    def __init__(self, val_examples: int, floor_accuracy: float = -1.0, tolerance: float | None = None):
        self.tolerance = (1.0 / max(1, val_examples) if tolerance is None else tolerance) + 1e-6
        self.floor = floor_accuracy
        self.best_accuracy, self.best_loss, self.top_accuracy = floor_accuracy, math.inf, -1.0
        self.best_epoch, self.best_state, self.stale = 0, None, 0

    def update(self, epoch: int, accuracy: float, loss: float, model: nn.Module) -> bool:
        self.top_accuracy = max(self.top_accuracy, accuracy)
        improved = accuracy >= self.floor and (
            accuracy > self.best_accuracy + self.tolerance
            or (
                accuracy >= self.top_accuracy - self.tolerance
                and (loss, -accuracy) < (self.best_loss, -self.best_accuracy)
            )
        )
        if improved:
            self.best_accuracy, self.best_loss, self.best_epoch, self.stale = accuracy, loss, epoch, 0
            self.keep(model)
        else:
            self.stale += 1
        return improved

    def keep(self, model: nn.Module) -> None:
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in _plain(model).state_dict().items()}

    def state(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def load(self, state: dict) -> None:
        vars(self).update(state)


class WeightAverage:
    """An exponential moving average of the weights and BatchNorm statistics, updated after every step (one
    fused kernel per step on a GPU). Its time constant is given in epochs, so it means the same at batch 8 on
    a CPU (hundreds of steps an epoch) as at batch 512 on a GPU (a handful)."""

    def __init__(self, model: nn.Module, epochs: float, steps_per_epoch: int):
        self.model = copy.deepcopy(_plain(model)).eval().requires_grad_(False)
        self.decay = 1.0 - 1.0 / max(1.0, epochs * steps_per_epoch)
        self.updates = 0
        pairs = list(zip(self.model.state_dict().values(), _plain(model).state_dict().values(), strict=True))
        # Lists built once: the update runs every step, and a 28 px GPU step is a few milliseconds.
        self._averaged = [a for a, _ in pairs if a.is_floating_point()]
        self._live = [b for a, b in pairs if a.is_floating_point()]
        self._counts = [a for a, _ in pairs if not a.is_floating_point()]
        self._live_counts = [b for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # Early on the average would be mostly the random start: its weight fades in over the first steps.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - decay)
        if self._counts:  # BatchNorm's step counts: one launch for all of them, not one per layer
            torch._foreach_copy_(self._counts, self._live_counts)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


class BudgetPlanner:
    """How many training steps still fit: the remaining budget, less the final test pass, at the slowest
    steady-state step seen, each epoch (a last one cut short included) ending with a validation pass. Planning
    in steps, not whole epochs, lets the schedule end when the budget does: a 60 s fine-tune whose second
    epoch did not quite fit used to stop after one, 20 s early. Warm-up steps are excluded from a step's time:
    they are paid once, not every epoch."""

    def __init__(self, budget_seconds: float, started: float, steps_per_epoch: int):
        self.budget, self.started, self.steps_per_epoch = budget_seconds, started, steps_per_epoch
        self.step_seconds = 0.0
        self.val_seconds = 0.0
        self.test_reserve = 0.0
        self.measured = False
        """False while the figures are estimates (a timed step, the probe's passes): the first epoch replaces
        them; later epochs can only make them slower."""

    def record(self, stats: EpochStats, eval_seconds: float, test_fraction: float) -> None:
        steady = stats.steps - stats.warmup_steps
        if steady > 0:
            step_seconds = (stats.seconds - stats.warmup_seconds) / steady
        else:  # every step was a warm-up one: the cautious figure
            step_seconds = stats.seconds / max(1, stats.steps)
        if not self.measured:
            self.step_seconds = self.val_seconds = 0.0
        self.step_seconds = max(self.step_seconds, step_seconds)
        self.val_seconds = max(self.val_seconds, eval_seconds)
        self.test_reserve = eval_seconds * test_fraction
        self.measured = True

    def remaining(self) -> float:
        return self.budget - (time.perf_counter() - self.started) - self.test_reserve

    def steps_that_fit(self) -> int:
        """Steps that fit from an epoch's start: whole epochs, then what a last, shorter one can take."""
        left = self.remaining()
        epoch = self.steps_per_epoch * max(self.step_seconds, 1e-6) + self.val_seconds
        whole = max(0, int(left // epoch))
        partial = int((left - whole * epoch - self.val_seconds) // max(self.step_seconds, 1e-6))
        return whole * self.steps_per_epoch + min(max(0, partial), self.steps_per_epoch - 1)

    def out_of_time(self) -> bool:
        return self.remaining() <= 0


def _plain(model: nn.Module) -> nn.Module:
    """The module itself under torch.compile or DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def freeze_front(model: nn.Module, fraction: float) -> int:
    """Stop training the first `fraction` of the backbone's parameter tensors (in definition order, which is
    the forward order for timm's CNNs); returns how many. The head always trains."""
    head = set(model.get_classifier().parameters())
    backbone = [p for p in model.parameters() if p not in head]
    frozen = backbone[: int(len(backbone) * fraction)]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return len(frozen)


def _make_optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    head = set(model.get_classifier().parameters())
    groups = [
        {
            "params": [p for p in model.parameters() if p not in head and p.requires_grad],
            "lr": config.lr_backbone if config.pretrained else config.lr_head,
        },
        {"params": list(head), "lr": config.lr_head},
    ]
    for group in groups:
        group["base_lr"] = group["lr"]
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for all parameters
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay, **fused)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, **fused)


def _load_optimizer_state(optimiser: torch.optim.Optimizer, saved: dict) -> None:
    """A checkpoint's optimizer state, kept on this run's implementation: `load_state_dict` also restores the
    saved groups' flags (fused, foreach, capturable), and a checkpoint written on a CPU would turn a GPU run's
    fused AdamW into the CPU's kind, its step counts left on the host where the fused kernels cannot read them."""
    own = [
        {k: group[k] for k in ("fused", "foreach", "capturable") if k in group}
        for group in optimiser.param_groups
    ]
    optimiser.load_state_dict(saved)
    for group, flags in zip(optimiser.param_groups, own, strict=True):
        group.update(flags)
        if group.get("fused") or group.get("capturable"):
            for parameter in group["params"]:
                state = optimiser.state.get(parameter, {})
                if "step" in state:
                    state["step"] = state["step"].to(device=parameter.device, dtype=torch.float32)


def class_weights(labels: np.ndarray, num_classes: int, above: float | None) -> torch.Tensor | None:
    """Inverse-frequency weights (mean 1) when the imbalance ratio exceeds `above`, else None."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts[counts > 0]
    if above is None or len(present) < 2 or present.max() / present.min() <= above:
        return None
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def training_loss(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    loss_weights: torch.Tensor | None,
) -> torch.Tensor:
    """An augmented batch through the model: the training loss (bf16 autocast on a GPU or a bf16 CPU)."""
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device):
        logits = model(x)
    return smoothed_cross_entropy(logits, labels, config.label_smoothing, loss_weights)


def smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float, weight: torch.Tensor | None
) -> torch.Tensor:
    """`F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing)`, the same value, without
    its wait on the GPU: with class weights and smoothing, PyTorch normalises by the labels' weights through a
    `masked_select`, whose output size the host must read back. That wait, every step, cost 16% of the raw
    loop's speed at 28 px on an H200 (bench/gpu_train.py --attribute)."""
    log_p = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)  # bf16: float32
    picked = -log_p.gather(1, labels[:, None]).squeeze(1)
    if weight is None:
        return (1 - smoothing) * picked.mean() - smoothing * log_p.mean(1).mean()
    label_weight = weight[labels]
    spread = -(log_p * weight).sum(1) / logits.shape[1]
    return ((1 - smoothing) * label_weight * picked + smoothing * spread).sum() / label_weight.sum()


def time_training_step(
    model: nn.Module,
    feed: BatchFeed,
    prep: Preprocessing,
    config: TrainConfig,
    freeze_bn: bool,
    loss_weights: torch.Tensor | None,
) -> float:
    """Seconds of a training step's augmentation, forward and backward on a real batch, weights untouched.

    Measured, not inferred from forward passes: what a step costs depends on what trains (a frozen front of the
    backbone stops backpropagation early: about half the full cost on lite2). The second of two steps is timed,
    after the one-off set-up (allocations, cuDNN autotuning), with a generator of its own so that the run's
    random draws are those of a run without it; BatchNorm statistics are put back. 0.0 when there is no batch."""
    batches = feed.epoch(torch.arange(len(feed)))
    first = next(batches, None)
    batches.close()
    if first is None:
        return 0.0
    stored, labels = first
    model.train()
    if freeze_bn:
        _set_bn_eval(model)
    statistics = [buffer.detach().clone() for buffer in model.buffers()]
    generator = torch.Generator(device=feed.device).manual_seed(config.seed)
    seconds = 0.0
    for _ in range(2):
        started = time.perf_counter()
        x = augment_batch(stored, prep, config.augmentation, generator)
        training_loss(model, x, labels, config, loss_weights).backward()
        if feed.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), statistics, strict=True):
            buffer.copy_(saved)
    return seconds


@dataclass
class EpochStats:
    loss: float
    seconds: float
    warmup_seconds: float
    images: int
    """Images trained after the warm-up steps, over `seconds - warmup_seconds`."""
    step_rates: list[float]
    steps: int
    warmup_steps: int
    """Of `steps`, those in `warmup_seconds`."""


def train_epoch(
    train_step: EagerStep | GraphedStep,
    feed: BatchFeed,
    prep: Preprocessing,
    config: TrainConfig,
    schedule: Callable[[int], float],
    step: int,
    generator: torch.Generator,
    augment_generator: torch.Generator,
    warmup_steps: int,
    deadline: float,
    stop_at: int,
    label: str,
    average: WeightAverage | None = None,
) -> tuple[EpochStats, int]:
    """One pass over the training split; stops early at `deadline` (perf_counter) or at global step `stop_at`.
    Returns stats and the global step. Losses stay on the device until the end: a .item() per step would stall
    the GPU pipeline."""
    device = feed.device
    started = time.perf_counter()
    order = torch.randperm(len(feed), generator=generator)
    losses, warmup_done_at, images, rates = [], None, 0, []
    step_started = started
    bar = tqdm(
        total=feed.steps(),
        desc=label,
        unit="step",
        leave=False,
        disable=os.environ.get("VISIONROUTE_NO_BAR") == "1",
    )
    together = steps_together(device, feed.rank_batch(), prep.channels, prep.input_size)
    batches = augmented(feed.epoch(order), prep, config.augmentation, augment_generator, together)
    try:
        for index, (x, labels) in enumerate(batches):
            losses.append(train_step(x, labels, schedule(step)))
            if average is not None:
                average.update()
            step += 1
            if index < warmup_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                warmup_done_at = time.perf_counter()
            else:
                images += len(labels)
                if device.type == "cpu":  # per-step rates only where reading the clock does not sync a device
                    now = time.perf_counter()
                    rates.append(len(labels) / (now - step_started))
            step_started = time.perf_counter()
            bar.update(1)
            if index % 20 == 0 and device.type == "cpu":
                bar.set_postfix(loss=f"{losses[-1].item():.3f}")
            if step >= stop_at or time.perf_counter() > deadline:
                break
    finally:
        batches.close()  # a streaming feed's reader thread stops now, also when a step failed
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    warmup = (warmup_done_at - started) if warmup_done_at else 0.0
    mean_loss = torch.stack(losses).float().mean().item() if losses else math.nan
    warmed = min(warmup_steps, len(losses))
    return EpochStats(mean_loss, seconds, warmup, images, rates, len(losses), warmed), step


@dataclass
class Checkpoint:
    """Everything `train` needs to continue where it stopped: written atomically after each epoch."""

    folder: Path
    FORMAT = 2
    """Bumped when the payload changes meaning (2: the plan in steps); an older checkpoint is not resumed."""

    def save(self, payload: dict, best: bool) -> None:
        payload = {**payload, "format": self.FORMAT}
        staging = self.folder / f"last.pt.tmp-{os.getpid()}"
        for attempt in (1, 2):  # a concurrent run of the same task that finished may delete the folder
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                torch.save(payload, staging)
                os.replace(staging, self.folder / "last.pt")  # a kill -9 mid-write leaves the last one intact
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        if best:
            torch.save(
                {"model": payload["model"], "epoch": payload["epoch"], "metrics": payload["record"]}, staging
            )
            os.replace(staging, self.folder / "best.pt")

    def load(self, key: str) -> dict | None:
        path = self.folder / "last.pt"
        if not path.exists():
            return None
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if payload.get("resume_key") != key or not key:
            return None
        if payload.get("format") != self.FORMAT:
            print(
                f"not resuming from {path}: written by an older visionroute; training from the start",
                flush=True,
            )
            return None
        return payload


def _same_resume_on_every_rank(resumed: dict | None, checkpoint: Checkpoint | None, device) -> None:
    """Every rank resumes from the same step, or every rank fails with the same error. A node that cannot see
    rank 0's checkpoint folder would start afresh, with an optimizer state of its own, and its weights would
    drift from the others' while DDP averaged their gradients."""
    if distributed.world_size() == 1:
        return
    here = resumed["step"] if resumed is not None else -1
    first = distributed.broadcast_ints([here], device)[0]
    if distributed.mean(float(here != first), device) > 0:
        seen = "no checkpoint" if here < 0 else f"a checkpoint at step {here}"
        theirs = "no checkpoint" if first < 0 else f"a checkpoint at step {first}"
        folder = checkpoint.folder if checkpoint else "(none)"
        other = f"rank {distributed.rank()} {seen}" if here != first else "another rank something else"
        raise RuntimeError(
            f"the ranks disagree on where to resume from {folder}: rank 0 sees {theirs}, {other}. Every node "
            "must see the same checkpoint folder: put the state folder (VISIONROUTE_STATE) on a filesystem all "
            "nodes share, or delete that folder on every node to train from the start"
        )


def train(
    config: TrainConfig, model: nn.Module, data: DecodedData, on_epoch: Callable[[dict], None] | None = None
) -> TrainResult:
    """Linear probe (when pretrained), then full training under the budget; returns the best model by val."""
    started = time.perf_counter()
    seed_everything(config.seed)
    device = pick_device()
    prep = data.preprocessing
    num_classes = len(prep.classes)
    batch_size = config.batch_size or default_batch_size(device, prep)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    result = TrainResult(model, prep, device=device.type, batch_size=batch_size, precision=precision(device))
    checkpoint = Checkpoint(config.checkpoint_dir) if config.checkpoint_dir else None
    resumed = checkpoint.load(config.resume_key) if checkpoint else None
    _same_resume_on_every_rank(resumed, checkpoint, device)

    # Probe: a head fitted on frozen features of the centre crops the train images get at evaluation.
    # A model whose threshold is chosen on validation is judged by what the threshold is chosen from: AUC.
    select_on_auc = config.choose_threshold and num_classes == 2
    selection = ModelSelection(len(data.val), tolerance=AUC_TOLERANCE if select_on_auc else None)
    eval_seconds_per_image = 0.0  # known from the probe's forward passes, else after the first epoch
    if config.pretrained and config.linear_probe and resumed is None:
        train_f = predict_logits(model, data.train.x, prep, device, features=True)
        val_f = predict_logits(model, data.val.x, prep, device, features=True)
        eval_seconds_per_image = (time.perf_counter() - started) / max(1, len(data.train) + len(data.val))
        probe = fit_linear_probe(
            train_f, torch.from_numpy(data.train.y), val_f, torch.from_numpy(data.val.y), num_classes
        )
        classifier = model.get_classifier()
        with torch.no_grad():
            classifier.weight.copy_(probe.pop("weight"))
            classifier.bias.copy_(probe.pop("bias"))
        probe["seconds"] = round(time.perf_counter() - started, 2)
        result.probe = probe
        selection = ModelSelection(len(data.val), floor_accuracy=probe["val_accuracy"])
        selection.keep(model)

    freeze_bn = config.pretrained and len(data.train) < config.freeze_bn_below
    if freeze_bn and config.frozen_fraction:
        result.frozen_tensors = freeze_front(model, config.frozen_fraction)
    optimiser = _make_optimizer(config, model, device)
    world, rank = distributed.world_size(), distributed.rank()
    feed = BatchFeed(data.train, batch_size, device, rank=rank, world=world)
    steps_per_epoch = feed.steps()
    if steps_per_epoch == 0:
        raise DatasetError(
            f"the training split has {len(data.train)} image(s): too few to train in {world} process(es) "
            "(each needs at least two); add training images or train in fewer processes"
        )
    weights = class_weights(data.train.y, num_classes, config.class_weighted_above)
    result.class_weights = weights.tolist() if weights is not None else None
    loss_weights = weights.to(device) if weights is not None else None
    generator = torch.Generator().manual_seed(config.seed)  # the epoch order: on the CPU, same on any device
    augment_generator = torch.Generator(device=device).manual_seed(config.seed)
    trainable = torch.compile(model) if config.compile and device.type == "cuda" else model
    average = WeightAverage(model, config.average_epochs, steps_per_epoch) if config.average_epochs else None
    judged = average.model if average else model  # the weights validated, selected and registered

    # The cosine schedule is planned for the steps that fit, then re-planned after each epoch from its measured
    # time, so that it ends when the budget does instead of being cut off mid-decay.
    budget = BudgetPlanner(config.budget_seconds, started, steps_per_epoch)
    max_steps = config.max_epochs * steps_per_epoch
    plan = {"steps": max_steps}
    if eval_seconds_per_image:
        # A first plan from a timed training step and the probe's forward passes, and room for validation and
        # the test pass: a 60 s fine-tune on 2 cores had planned 8 epochs, spent all of its one epoch warming up
        # and stopped at the peak learning rate (held out 0.954).
        budget.test_reserve = eval_seconds_per_image * (len(data.val) + len(data.test))
        budget.step_seconds = time_training_step(model, feed, prep, config, freeze_bn, loss_weights)
        budget.val_seconds = eval_seconds_per_image * len(data.val)
        plan["steps"] = max(1, min(max_steps, budget.steps_that_fit()))
    plan["warmup"] = min(plan["steps"] // 2, int(config.warmup_epochs * steps_per_epoch))
    # Each rank timed its own probe: all follow rank 0's plan, or their learning rates would drift apart.
    plan["steps"], plan["warmup"] = distributed.broadcast_ints([plan["steps"], plan["warmup"]], device)

    def schedule(step: int) -> float:
        return lr_factor(step, plan["warmup"], plan["steps"])

    def planned_epochs() -> int:
        return math.ceil(plan["steps"] / steps_per_epoch)

    epoch, step = 0, 0
    if resumed is not None:
        _plain(model).load_state_dict(resumed["model"])
        _load_optimizer_state(optimiser, resumed["optimizer"])
        generator.set_state(resumed["generator"])
        augment_generator.set_state(resumed["augment_generator"])
        torch.set_rng_state(resumed["torch_rng"])
        selection.load(resumed["selection"])
        if average is not None and resumed.get("average"):
            average.load(resumed["average"])
        epoch, step, plan["steps"] = resumed["epoch"], resumed["step"], resumed["planned_steps"]
        plan["warmup"] = resumed["warmup_steps"]
        result.history, result.probe = resumed["history"], resumed["probe"]
        result.resumed_from_epoch = epoch
        budget.step_seconds, budget.val_seconds = resumed["step_seconds"], resumed["val_seconds"]
        budget.measured = True
        print(f"resumed from epoch {epoch} ({checkpoint.folder / 'last.pt'})", flush=True)

    if world > 1:
        # Wrapped after any resume: DDP copies rank 0's weights to every rank and averages gradients.
        from torch.nn.parallel import DistributedDataParallel

        trainable = DistributedDataParallel(
            trainable, device_ids=[device.index] if device.type == "cuda" else None
        )
    train_step = make_step(
        trainable,
        optimiser,
        lambda x, labels: training_loss(trainable, x, labels, config, loss_weights),
        device,
        graphed=config.cuda_graph
        and graphable(device, prep.input_size, config.optimizer, world, config.compile),
    )
    train_seconds, trained_images = 0.0, 0
    result.stopped = resumed["stopped"] if resumed is not None else "max_epochs"
    while step < plan["steps"]:
        epoch += 1
        trainable.train()
        if freeze_bn:
            _set_bn_eval(model)
        stats, step = train_epoch(
            train_step,
            feed,
            prep,
            config,
            schedule,
            step,
            generator,
            augment_generator,
            WARMUP_STEPS[device.type] if epoch == result.resumed_from_epoch + 1 else 0,
            # Under DDP the budget is checked between epochs only: a per-step agreement would stall every step.
            # Room for the validation pass of an epoch the clock cuts short.
            math.inf
            if world > 1
            else started + config.budget_seconds - budget.test_reserve - budget.val_seconds,
            plan["steps"],
            f"epoch {epoch}/{planned_epochs()}",
            average,
        )
        result.warmup_seconds += stats.warmup_seconds
        train_seconds += stats.seconds - stats.warmup_seconds
        trained_images += stats.images
        result.step_images_per_s += stats.step_rates

        eval_started = time.perf_counter()
        val_logits = predict_logits(judged, data.val.x, prep, device)
        eval_seconds = time.perf_counter() - eval_started
        val_y = torch.from_numpy(data.val.y)
        val_accuracy = (val_logits.argmax(1) == val_y).float().mean().item() if len(val_y) else 0.0
        val_loss = F.cross_entropy(val_logits, val_y).item() if len(val_y) else 0.0
        val_auc = roc_auc(data.val.y, val_logits.softmax(1)[:, 1].numpy()) if num_classes == 2 else None
        budget.record(stats, eval_seconds, len(data.test) / max(1, len(data.val)))
        record = {
            "epoch": epoch,
            "epochs": planned_epochs(),
            "train_loss": distributed.mean(stats.loss, device),
            "val_accuracy": val_accuracy,
            "val_loss": val_loss,
            **({"val_auc": val_auc} if val_auc is not None else {}),
            "seconds": round(stats.seconds + eval_seconds, 2),
            "train_seconds": round(stats.seconds - stats.warmup_seconds, 3),
            "lr_factor": schedule(step - 1),
        }
        result.history.append(record)
        score = val_auc if select_on_auc and val_auc is not None else val_accuracy
        improved = selection.update(epoch, score, val_loss, judged)
        if distributed.is_main():  # one line per epoch, not one per rank
            print(
                f"epoch {epoch}/{planned_epochs()}  loss {stats.loss:.4f}  val_acc {val_accuracy:.4f}  "
                f"val_loss {val_loss:.4f}  "
                + (f"val_auc {val_auc:.4f}  " if val_auc is not None else "")
                + f"{record['seconds']:.1f}s"
                + ("  *best" if improved else ""),
                flush=True,
            )
        fit = budget.steps_that_fit()
        if config.patience is not None and selection.stale >= config.patience:
            result.stopped = "early_stopping"
        elif step < max_steps and (budget.out_of_time() or fit == 0):
            result.stopped = "budget"
        elif (epoch == 1 and step < plan["steps"]) or step + fit < plan["steps"]:
            # Shorter when steps are slower than planned; after the first, measured epoch also longer (up to
            # max_epochs) when the estimate was too cautious, unless its decay is over (a plan of one epoch or
            # less). Never longer later: the decay is under way.
            plan["steps"] = min(max_steps, step + fit)
        # Every rank follows rank 0's decision, so none waits in a collective the others have left.
        code, plan["steps"] = distributed.broadcast_ints([STOPS.index(result.stopped), plan["steps"]], device)
        result.stopped = STOPS[code]
        if checkpoint and distributed.is_main():
            checkpoint.save(
                {
                    "resume_key": config.resume_key,
                    "model": _plain(model).state_dict(),
                    "optimizer": optimiser.state_dict(),
                    "generator": generator.get_state(),
                    "augment_generator": augment_generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "selection": selection.state(),
                    "average": average.state() if average else None,
                    "epoch": epoch,
                    "step": step,
                    "planned_steps": plan["steps"] if result.stopped == "max_epochs" else step,
                    "stopped": result.stopped,
                    "warmup_steps": plan["warmup"],
                    "history": result.history,
                    "probe": result.probe,
                    "step_seconds": budget.step_seconds,
                    "val_seconds": budget.val_seconds,
                    "record": record,
                },
                improved,
            )
        if on_epoch:
            on_epoch(record)
        if result.stopped != "max_epochs":
            break

    result.cuda_graph = train_step.graphed  # False where the capture fell back to eager steps
    if selection.best_state is not None:
        _plain(model).load_state_dict(selection.best_state)
    elif average is not None:
        _plain(model).load_state_dict(average.model.state_dict())
    result.best_epoch = selection.best_epoch
    result.train_images_per_s = trained_images / train_seconds if train_seconds > 0 else 0.0
    if config.choose_threshold and num_classes == 2 and len(data.val):
        val_scores = predict_logits(model, data.val.x, prep, device).softmax(1)[:, 1].numpy()
        prep = replace(prep, threshold=binary_threshold(data.val.y, val_scores))
        result.preprocessing = prep
    if distributed.is_main():  # the other ranks' model is the same: rank 0 evaluates and registers it
        result.test = evaluate(model, data.test.x, data.test.y, prep, device)
    result.seconds = time.perf_counter() - started
    model.cpu().eval()
    return result


def evaluate(model: nn.Module, x, y, prep: Preprocessing, device=None) -> dict:
    """The classification report on stored squares; two classes also get ROC AUC, at the model's threshold."""
    device = device or pick_device()
    if not isinstance(model, torch.fx.GraphModule):
        model.to(device)
    else:
        device = torch.device("cpu")  # registry models are loaded on the CPU
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    logits = predict_logits(model, x, prep, device)
    predictions = prep.decide(logits).numpy() if len(logits) else np.zeros(0, dtype=int)
    report = classification_report(y, predictions, prep.classes)
    if len(prep.classes) == 2 and len(logits):
        report["auc"] = roc_auc(y, logits.softmax(1)[:, 1].numpy())
        report["threshold"] = prep.threshold
    return report


def preprocessing_dict(prep: Preprocessing) -> dict:
    return prep.to_dict()
