"""Route `scratch`: a timm CNN trained from random weights, for far-from-ImageNet domains with tens of
thousands of labelled images, or production models with a proven need.

Recipe: pick the model (spec or auto) -> random init -> train with the shared engine (one learning rate,
BatchNorm statistics learned, more epochs) under the budget -> evaluate -> log, register, promote.
GPUs make this route practical; on CPU it runs, slowly, within the budget it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from visionroute.backends.base import BackendContext, BackendResult, register_backend

from visionroute.training.engine import TrainConfig
from visionroute.training.tracked import model_for, run_training_route


@dataclass
class ScratchBackend:
    name: str = "scratch"
    max_epochs: int = 90

    def run(self, context: BackendContext) -> BackendResult:
        spec = context.spec
        model_name = model_for(context, self.name, hub=False)
        config = TrainConfig(
            model_name,
            pretrained=False,
            linear_probe=False,
            max_epochs=spec.training.epochs or self.max_epochs,
            budget_seconds=spec.training.budget_minutes * 60,
            lr_head=1e-3,
            warmup_epochs=2.0,
            patience=10,
            augment_scale=(0.08, 1.0),
            seed=spec.training.seed,
        )
        return run_training_route(context, self.name, config, weights=None)


@register_backend("scratch")
def create_scratch_backend(**config) -> ScratchBackend:
    return ScratchBackend(**config)
