"""Route `vision_api`: generic tasks (tags, OCR, objects, faces) through a cloud Vision API or on premises.

The providers (google, aws, azure, local) land with the Vision API issue (#3). Until then this backend
refuses clearly, so a flow never pretends to have labelled anything; `visionroute decide` still answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from visionroute.backends.base import BackendContext, BackendResult, BackendUnavailable, register_backend

PROVIDERS = ("google", "aws", "azure", "local")


@dataclass
class VisionApiBackend:
    name: str = "vision_api"

    def run(self, context: BackendContext) -> BackendResult:
        provider = context.decision.provider
        raise BackendUnavailable(
            f"the vision_api route (provider '{provider}') is decided but cannot run yet: its providers "
            f"({', '.join(PROVIDERS)}) land with the Vision API issue (#3). The decision is recorded; "
            "run `visionroute decide` to see it, or force route finetune for a classify/tag task with labelled data."
        )


@register_backend("vision_api")
def create_vision_api_backend(**config) -> VisionApiBackend:
    return VisionApiBackend(**config)
