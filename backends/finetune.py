"""Route `finetune`: a pretrained timm CNN, linear probe then full fine-tuning, tracked and registered.

Recipe: pick the model (spec or auto) -> resolve pretrained weights (checkpoint, registry, offline package,
hub) -> train with the shared engine under the spec's budget -> evaluate on the held-out split -> log, register,
promote if it beats the champion.
"""

from __future__ import annotations

from dataclasses import dataclass

from visionroute.backends.base import BackendContext, BackendResult, register_backend

from visionroute.training.engine import TrainConfig, build_model
from visionroute.training.tracked import model_for, run_training_route
from visionroute.training.weights import hub_allowed, resolve_pretrained


@dataclass
class FineTuneBackend:
    name: str = "finetune"
    max_epochs: int = 8

    def run(self, context: BackendContext) -> BackendResult:
        spec = context.spec
        model_name = model_for(context, self.name, hub=hub_allowed())
        classes = len(context.dataset.classes) if context.dataset else 2
        weights = resolve_pretrained(
            model_name,
            build_model(model_name, classes),
            str(spec.training.checkpoint) if spec.training.checkpoint else None,
        )
        config = TrainConfig(
            model_name,
            pretrained=True,
            linear_probe=True,
            max_epochs=spec.training.epochs or self.max_epochs,
            budget_seconds=spec.training.budget_minutes * 60,
            seed=spec.training.seed,
        )
        return run_training_route(context, self.name, config, weights)


@register_backend("finetune")
def create_finetune_backend(**config) -> FineTuneBackend:
    return FineTuneBackend(**config)
