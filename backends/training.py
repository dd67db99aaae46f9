"""Routes `finetune` and `scratch`: one training backend, two recipes (visionroute/training/recipes.py).

Recipe: the model the decision named -> weights (pretrained for fine-tuning: checkpoint, registry, offline
package, hub; random for scratch) -> the shared engine under the spec's budget -> evaluate on the held-out split
-> log, register, promote if it beats the champion. Fine-tuning keeps three channels (its weights were learned
on RGB); scratch trains greyscale data as one channel and 28-64 px data at its native size.
"""

from __future__ import annotations

from dataclasses import dataclass

from visionroute.backends.base import BackendContext, BackendResult, register_backend

from visionroute.training.recipes import FINETUNE, SCRATCH, Recipe


@dataclass
class TrainingBackend:
    recipe: Recipe
    max_epochs: int | None = None
    """Overrides the recipe's bound (tests); the spec's training.epochs overrides both."""

    @property
    def name(self) -> str:
        return self.recipe.name

    def run(self, context: BackendContext) -> BackendResult:
        # Imported when a training route runs: torch, timm and MLflow take seconds to import, which every CLI
        # command, every flow run a worker starts and `prefect deploy` would otherwise pay.
        import torch

        from visionroute.data.dataset import native_shape
        from visionroute.training import distributed
        from visionroute.training.catalogue import catalogue_entry
        from visionroute.training.engine import TrainConfig, build_model, cpu_bf16
        from visionroute.training.launch import train_under_torchrun
        from visionroute.training.tracked import follow_training_route, model_for, run_training_route
        from visionroute.training.weights import hub_allowed, resolve_pretrained

        cpu_bf16()  # a bad VISIONROUTE_CPU_BF16 fails here, in the flow, before any data is decoded
        spec, recipe = context.spec, self.recipe
        model_name = model_for(context, recipe.name, hub=recipe.pretrained and hub_allowed())
        classes = len(context.dataset.classes)
        channels, native = native_shape(context.dataset)
        if recipe.pretrained:
            channels = 3
        small = catalogue_entry(model_name).small_input
        model = build_model(model_name, classes, in_chans=channels, input_size=native if small else None)
        weights = None
        if recipe.pretrained:
            checkpoint = str(spec.training.checkpoint) if spec.training.checkpoint else None
            weights = resolve_pretrained(model_name, model, checkpoint)
        config = TrainConfig.from_recipe(
            recipe,
            model_name,
            max_epochs=spec.training.epochs or self.max_epochs or recipe.max_epochs,
            budget_seconds=spec.training.budget_minutes * 60,
            seed=spec.training.seed,
        )
        processes = distributed.processes_for(recipe.name, spec.training.processes, torch.cuda.device_count())
        if (processes > 1 or distributed.multi_node()) and not distributed.under_torchrun():
            # Started again in `processes` ranks; this process waits and reports their progress and result.
            return train_under_torchrun(context, recipe.name, processes, {"max_epochs": self.max_epochs})
        # Under torchrun every rank trains; rank 0 alone tracks, checkpoints and registers.
        route = run_training_route if distributed.is_main() else follow_training_route
        return route(context, recipe.name, config, model, weights, channels=channels, native_size=native)


@register_backend("finetune")
def create_finetune_backend(**config) -> TrainingBackend:
    return TrainingBackend(FINETUNE, **config)


@register_backend("scratch")
def create_scratch_backend(**config) -> TrainingBackend:
    return TrainingBackend(SCRATCH, **config)
