"""One conformance suite every registered Vision API provider passes (as scikit-learn's checks do for
estimators), and the on-premises provider's own behaviour: real ImageNet tags, Tesseract OCR, no network."""

from __future__ import annotations

import hashlib
import io

import pytest
import skimage.data
from conftest import COLOURS, make_image
from fakes.aws_fake import RekognitionFake
from fakes.azure_fake import AzureVisionFake
from fakes.behaviour import FakeBehaviour
from fakes.google_fake import GoogleGrpcFake
from PIL import Image, ImageDraw, ImageFont

from visionroute.vision.base import (
    FEATURES,
    Annotation,
    ApiError,
    ImageInput,
    Provider,
    ProviderSettings,
    create_provider,
    list_providers,
)
from visionroute.vision.local import LocalProvider
from visionroute.vision.ratelimit import Limiter
from visionroute.vision.runner import annotate_images, prepare


def test_every_builtin_provider_is_registered():
    assert list_providers() == ["aws", "azure", "google", "local"]


def _fake(name: str, credentials: dict):
    if name == "google":
        return GoogleGrpcFake(FakeBehaviour())
    if name == "aws":
        return RekognitionFake(FakeBehaviour(max_batch=1))
    if name == "azure":
        return AzureVisionFake(FakeBehaviour(max_batch=1), key=credentials["VISION_KEY"])
    return None


@pytest.mark.parametrize("name", list_providers())
def test_provider_conformance(name, cloud_credentials, tmp_path):
    fake = _fake(name, cloud_credentials)
    if fake:
        fake.start()
    try:
        provider = create_provider(name, ProviderSettings(endpoint=fake.endpoint if fake else None))
        assert isinstance(provider, Provider)
        assert provider.features() <= set(FEATURES) and provider.features()
        assert provider.max_batch >= 1 and provider.api_version
        paths = [make_image(tmp_path / f"{i}.jpg", COLOURS["red"], seed=i, size=(160, 120)) for i in range(2)]
        images = [prepare(str(path), provider) for path in paths]
        assert all(isinstance(image, ImageInput) for image in images)
        for feature in sorted(provider.features()):
            answers = provider.annotate(images[: provider.max_batch], feature)
            assert len(answers) == min(2, provider.max_batch)
            for answer in answers:
                assert isinstance(answer, Annotation), answer
                for item in answer.labels + answer.objects:
                    assert item["name"] and 0 <= item["score"] <= 1
                for item in answer.text + answer.objects + answer.faces:
                    left, top, width, height = item["box"]
                    assert (
                        0 <= left <= 1 and 0 <= top <= 1 and 0 <= left + width <= 1 and 0 <= top + height <= 1
                    )
            assert answers[0].to_dict() == Annotation(**answers[0].to_dict()).to_dict()  # cacheable as JSON
        unsupported = sorted(set(FEATURES) - provider.features())
        for feature in unsupported:
            with pytest.raises(ApiError, match=feature):
                annotate_images(
                    [str(paths[0])], provider, feature, limiter=Limiter(None), emit=lambda row: None
                )
    finally:
        if fake:
            fake.stop()


def _input(image: Image.Image, name: str, fmt: str = "PNG") -> ImageInput:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    data = buffer.getvalue()
    return ImageInput(name, hashlib.sha256(data).hexdigest(), data, image.width, image.height, fmt)


def test_local_tags_a_real_photo_with_imagenet_classes():
    provider = LocalProvider(ProviderSettings())
    (answer,) = provider.annotate([_input(Image.fromarray(skimage.data.chelsea()), "chelsea.png")], "tag")
    names = [label["name"] for label in answer.labels]
    assert len(names) == 5 and any("cat" in name for name in names[:2])
    assert answer.labels[0]["score"] >= answer.labels[-1]["score"]


def test_local_reads_printed_text_with_tesseract():
    image = Image.new("RGB", (640, 120), "white")
    ImageDraw.Draw(image).text(
        (20, 30), "INVOICE 4711 TOTAL 42.50", fill="black", font=ImageFont.load_default(36)
    )
    (answer,) = LocalProvider(ProviderSettings()).annotate([_input(image, "invoice.png")], "ocr")
    assert [line["text"] for line in answer.text] == ["INVOICE 4711 TOTAL 42.50"]
    left, top, width, height = answer.text[0]["box"]
    assert 0 < left < 0.1 and 0.1 < top < 0.4 and width > 0.6 and 0 < height < 0.5


def test_local_ocr_without_tesseract_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract binary on it
    provider = LocalProvider(ProviderSettings())
    assert provider.features() == {"tag"}
    path = make_image(tmp_path / "a.jpg", COLOURS["red"], seed=1)
    with pytest.raises(ApiError, match=r"apt-get install tesseract-ocr"):
        annotate_images([str(path)], provider, "ocr", limiter=Limiter(None), emit=lambda row: None)


def test_local_provider_needs_no_network_and_no_credentials(monkeypatch):
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "AWS_ACCESS_KEY_ID", "VISION_KEY"):
        monkeypatch.delenv(name, raising=False)
    provider = create_provider("local")
    assert provider.default_quota.requests_per_s is None and provider.default_quota.units_per_s is None
