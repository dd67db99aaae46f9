"""The shared training engine: decode once, linear probe, fine-tune under a wall-clock budget, evaluate.

Both training routes use it: `finetune` starts from pretrained weights and a linear probe (LP-FT,
Kumar et al. 2022: fitting the head on frozen features first keeps fine-tuning from distorting them);
`scratch` starts from random weights with one learning rate.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from visionroute.data.dataset import ImageDataset, decode_all
from visionroute.training.metrics import classification_report


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input; logged with the model so predictions match training."""

    input_size: int
    resize: int
    """Short side the image is resized to before the centre crop (input_size / crop_pct)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: list[str]
    model_name: str

    @classmethod
    def for_model(cls, model: nn.Module, model_name: str, classes: list[str]) -> Preprocessing:
        config = timm.data.resolve_data_config({}, model=model)
        size = config["input_size"][-1]
        return cls(
            size,
            int(math.floor(size / config["crop_pct"])),
            config["mean"],
            config["std"],
            classes,
            model_name,
        )

    def resize_short(self, image: Image.Image) -> Image.Image:
        scale = self.resize / min(image.size)
        width, height = (
            max(self.resize, round(image.width * scale)),
            max(self.resize, round(image.height * scale)),
        )
        return image.resize((width, height), Image.BICUBIC)

    def center_crop_uint8(self, image: Image.Image) -> torch.Tensor:
        """3 x S x S uint8: resized and centre-cropped, not yet normalised (compact to cache)."""
        left, top = (image.width - self.input_size) // 2, (image.height - self.input_size) // 2
        crop = image.crop((left, top, left + self.input_size, top + self.input_size))
        return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalise(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=batch_uint8.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=batch_uint8.device).view(1, 3, 1, 1) * 255
        return (batch_uint8.float() - mean) / std

    def eval_input(self, image: Image.Image) -> torch.Tensor:
        """One normalised 1 x 3 x S x S tensor, as at prediction time."""
        return self.normalise(self.center_crop_uint8(self.resize_short(image))[None])


@dataclass
class TrainConfig:
    model_name: str
    pretrained: bool = True
    linear_probe: bool = True
    max_epochs: int = 8
    budget_seconds: float = 20 * 60
    batch_size: int | None = None
    """None: 8 on CPU (as fast as 16 on 2 cores, a third less memory), 64 on GPU."""
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    """Lower than the head's: pretrained features need only small changes."""
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    patience: int = 3
    """Epochs without a better validation accuracy before stopping."""
    freeze_bn_below: int = 5000
    """With fewer training images, BatchNorm statistics stay at their pretrained values."""
    augment_scale: tuple[float, float] = (0.25, 1.0)
    seed: int = 0
    checkpoint_dir: Path | None = None
    decode_workers: int = 2


@dataclass
class PreparedData:
    """Each image decoded and resized exactly once per run."""

    preprocessing: Preprocessing
    train_images: list[Image.Image]
    train_labels: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_refs: list[str]
    rejected: dict[str, str]


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
    first_step_seconds: float = 0.0
    step_images_per_s: list[float] = field(default_factory=list)
    """Per training step, from the second on; the median is robust to the machine's occasional stalls."""
    batch_size: int = 0
    device: str = "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_data(dataset: ImageDataset, preprocessing: Preprocessing, workers: int = 2) -> PreparedData:
    """Decode every image once; files that fail to decode come back in `rejected` with the reason."""
    decoded, rejected = decode_all(dataset, preprocessing.resize_short, workers=workers)

    def stack(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        samples = [s for s in dataset.split(split) if s.ref in decoded]
        if not samples:
            return (
                torch.zeros(0, 3, preprocessing.input_size, preprocessing.input_size, dtype=torch.uint8),
                torch.zeros(0, dtype=torch.long),
                [],
            )
        x = torch.stack([preprocessing.center_crop_uint8(decoded[s.ref]) for s in samples])
        return x, torch.tensor([s.label for s in samples]), [s.ref for s in samples]

    train = [s for s in dataset.split("train") if s.ref in decoded]
    val_x, val_y, _ = stack("val")
    test_x, test_y, test_refs = stack("test")
    return PreparedData(
        preprocessing,
        [decoded[s.ref] for s in train],
        torch.tensor([s.label for s in train]),
        val_x,
        val_y,
        test_x,
        test_y,
        test_refs,
        rejected,
    )


def _autocast(device: torch.device):
    # bf16 autocast on GPU only: CPU autocast is slower than fp32 on the 2-core machines this targets.
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x_uint8: torch.Tensor,
    prep: Preprocessing,
    device: torch.device,
    batch_size: int | None = None,
    features: bool = False,
) -> torch.Tensor:
    """Logits (or pooled pre-logit features) for cached uint8 crops, in eval mode."""
    # Small CPU batches: at 260 px one activation of a 64-image batch is ~800 MB, for no speed gain.
    batch_size = batch_size or (128 if device.type == "cuda" else 16)
    # A model loaded from the registry is a torch.export graph: already in eval mode, no .eval() to call.
    exported = isinstance(model, torch.fx.GraphModule)
    was_training = model.training
    if not exported:
        model.eval()
    outputs = []
    for start in range(0, len(x_uint8), batch_size):
        batch = prep.normalise(x_uint8[start : start + batch_size].to(device))
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            out = (
                model.forward_head(model.forward_features(batch), pre_logits=True)
                if features
                else model(batch)
            )
        outputs.append(out.float().cpu())
    if not exported:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0)


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


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    config: TrainConfig, model: nn.Module, data: PreparedData, on_epoch: Callable[[dict], None] | None = None
) -> TrainResult:
    """Linear probe (when pretrained), then full training under the budget; returns the best model by val."""
    started = time.perf_counter()
    seed_everything(config.seed)
    device = pick_device()
    prep = data.preprocessing
    num_classes = len(prep.classes)
    batch_size = config.batch_size or (64 if device.type == "cuda" else 8)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    result = TrainResult(model, prep, device=device.type, batch_size=batch_size)

    if config.pretrained and config.linear_probe:
        # Probe features come from the centre crops the train images would get at evaluation.
        train_crops = torch.stack([prep.center_crop_uint8(image) for image in data.train_images])
        train_f = predict_logits(model, train_crops, prep, device, features=True)
        val_f = predict_logits(model, data.val_x, prep, device, features=True)
        probe = fit_linear_probe(train_f, data.train_labels, val_f, data.val_y, num_classes)
        classifier = model.get_classifier()
        with torch.no_grad():
            classifier.weight.copy_(probe.pop("weight"))
            classifier.bias.copy_(probe.pop("bias"))
        probe["seconds"] = round(time.perf_counter() - started, 2)
        result.probe = probe

    transform = timm.data.create_transform(
        prep.input_size,
        is_training=True,
        scale=config.augment_scale,
        hflip=0.5,
        color_jitter=0.2,
        interpolation="bicubic",
        mean=prep.mean,
        std=prep.std,
        re_prob=0.0,
    )
    head = set(model.get_classifier().parameters())
    groups = [
        {
            "params": [p for p in model.parameters() if p not in head],
            "lr": config.lr_backbone if config.pretrained else config.lr_head,
        },
        {"params": list(head), "lr": config.lr_head},
    ]
    for group in groups:
        group["base_lr"] = group["lr"]
    optimiser = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 needs no loss scaling
    generator = torch.Generator().manual_seed(config.seed)
    n_train = len(data.train_images)
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))

    # The cosine schedule is planned for max_epochs, then re-planned after each epoch from its measured
    # time, so that it ends when the budget does instead of being cut off mid-decay.
    epochs = config.max_epochs
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(total_steps // 2, int(config.warmup_epochs * steps_per_epoch))

    best_accuracy, best_loss, best_state, stale, step, test_reserve = -1.0, math.inf, None, 0, 0, 0.0
    floor_accuracy, top_accuracy = -1.0, -1.0
    if result.probe:
        # The probed model is epoch 0: fine-tuning must match its validation accuracy to replace it. Its
        # loss is not a tie-break: label smoothing inflates the fine-tuned models' cross-entropy.
        best_accuracy, best_loss = result.probe["val_accuracy"], math.inf
        floor_accuracy = best_accuracy
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Throughput is counted from the second step on: the first pays one-off allocation and kernel set-up.
    train_seconds, trained_images, first_step_seconds = 0.0, 0, 0.0
    freeze_bn = config.pretrained and n_train < config.freeze_bn_below
    result.stopped = "max_epochs"
    epoch = 0
    while epoch < epochs:
        epoch += 1
        epoch_started = time.perf_counter()
        model.train()
        if freeze_bn:
            _set_bn_eval(model)
        order = torch.randperm(n_train, generator=generator).tolist()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", unit="step", leave=False)
        for index in bar:
            step_started = time.perf_counter()
            batch_ids = order[index * batch_size : (index + 1) * batch_size]
            x = torch.stack([transform(data.train_images[i]) for i in batch_ids]).to(device)
            y = data.train_labels[batch_ids].to(device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            factor = _lr_factor(step, warmup_steps, total_steps)
            for group in optimiser.param_groups:
                group["lr"] = group["base_lr"] * factor
            with _autocast(device):
                loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            losses.append(loss.item())
            step += 1
            step_seconds = time.perf_counter() - step_started
            if step == 1:
                first_step_seconds = step_seconds
            else:
                trained_images += len(batch_ids)
                result.step_images_per_s.append(len(batch_ids) / step_seconds)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if time.perf_counter() - started > config.budget_seconds - (test_reserve if epoch > 1 else 0.0):
                break
        train_seconds += time.perf_counter() - epoch_started - (first_step_seconds if epoch == 1 else 0.0)
        val_started = time.perf_counter()
        val_logits = predict_logits(model, data.val_x, prep, device)
        # The final test evaluation must fit in the budget too: estimate it from this validation pass.
        test_reserve = (time.perf_counter() - val_started) * len(data.test_x) / max(1, len(data.val_x))
        val_accuracy = (val_logits.argmax(1) == data.val_y).float().mean().item() if len(data.val_y) else 0.0
        val_loss = F.cross_entropy(val_logits, data.val_y).item() if len(data.val_y) else 0.0
        record = {
            "epoch": epoch,
            "epochs": epochs,
            "train_loss": float(np.mean(losses)),
            "val_accuracy": val_accuracy,
            "val_loss": val_loss,
            "seconds": round(time.perf_counter() - epoch_started, 2),
            "lr_backbone": groups[0]["base_lr"] * factor,
        }
        result.history.append(record)
        # Accuracies one validation image apart are noise on a small split (one image of 36 is 2.8 points):
        # within that of the best fine-tuned accuracy so far, the lower loss wins. Measured on the demo's
        # ants/bees: a first epoch at 36/36 ahead of later ones at 35/36 with lower loss held out 0.91.
        tolerance = 1.0 / max(1, len(data.val_y)) + 1e-6
        top_accuracy = max(top_accuracy, val_accuracy)
        improved = val_accuracy >= floor_accuracy and (
            val_accuracy > best_accuracy + tolerance
            or (
                val_accuracy >= top_accuracy - tolerance
                and (val_loss, -val_accuracy) < (best_loss, -best_accuracy)
            )
        )
        if improved:
            best_accuracy, best_loss, stale = val_accuracy, val_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result.best_epoch = epoch
        else:
            stale += 1
        if config.checkpoint_dir:
            _save_checkpoint(config.checkpoint_dir, model, record, improved)
        print(
            f"epoch {epoch}/{epochs}  loss {record['train_loss']:.4f}  val_acc {val_accuracy:.4f}  "
            f"val_loss {val_loss:.4f}  {record['seconds']:.1f}s" + ("  *best" if improved else ""),
            flush=True,
        )
        if on_epoch:
            on_epoch(record)
        if stale >= config.patience:
            result.stopped = "early_stopping"
            break
        remaining = config.budget_seconds - (time.perf_counter() - started) - test_reserve
        fits = max(0, int(remaining // max(record["seconds"], 1e-3)))
        if epoch < epochs and fits == 0:
            result.stopped = "budget"
            break
        if epoch + fits < epochs:
            epochs = epoch + fits
            total_steps = epochs * steps_per_epoch

    if best_state is not None:
        model.load_state_dict(best_state)
    result.train_images_per_s = trained_images / train_seconds if train_seconds > 0 else 0.0
    result.first_step_seconds = first_step_seconds
    result.test = evaluate(model, data.test_x, data.test_y, prep, device)
    result.seconds = time.perf_counter() - started
    model.cpu().eval()
    return result


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prep: Preprocessing, device=None) -> dict:
    device = device or pick_device()
    if not isinstance(model, torch.fx.GraphModule):
        model.to(device)
    else:
        device = torch.device("cpu")  # registry models are loaded on the CPU
    logits = predict_logits(model, x, prep, device)
    predictions = logits.argmax(1).numpy() if len(logits) else np.zeros(0, dtype=int)
    return classification_report(y.numpy(), predictions, prep.classes)


def _save_checkpoint(folder: Path, model: nn.Module, record: dict, best: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "epoch": record["epoch"], "metrics": record}
    torch.save(payload, folder / "last.pt")
    if best:
        torch.save(payload, folder / "best.pt")


def build_model(model_name: str, num_classes: int) -> nn.Module:
    """A timm model with random weights; pretrained ones are loaded by `weights.load_pretrained`."""
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes)


def preprocessing_dict(prep: Preprocessing) -> dict:
    return asdict(prep)
