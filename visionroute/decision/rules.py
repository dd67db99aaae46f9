"""The decision framework: which route a task takes, and why. Pure: no Prefect, no MLflow, no I/O.

Rules (thresholds in `Policy`):
1. Generic task (tag, ocr, detect_objects, detect_faces) -> vision_api, unless images may not leave the premises
   or the API bill at the monthly volume exceeds self-hosting. Then: labelled data -> finetune a custom model on
   premises; none -> vision_api with provider `local` (a pretrained model run on premises).
2. Specific task (classify), ImageNet-like domain -> finetune, whatever the size (unless rule 4).
3. Specific task, far domain: under `sufficient_for_scratch` labelled -> finetune with a weak-transfer warning;
   at or above -> scratch, or finetune from a registered domain-pretrained checkpoint.
4. proven_need with at least `sufficient_for_scratch` labelled -> scratch; with fewer -> finetune and a warning.
5. Specific task without labelled data -> error saying what to provide.
6. A forced route is honoured; the decision records the rule that would have applied and why they differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from visionroute.decision.costs import Prices, cheapest_provider, route_costs, self_hosted_monthly
from visionroute.decision.policy import DEFAULT_POLICY, Policy
from visionroute.spec import Domain, Route, Task, TaskSpec
from visionroute.training.catalogue import check_training_device, choose_model

LOCAL_PROVIDER = "local"
LOCAL_TASKS = frozenset({Task.tag, Task.ocr})
"""What the on-premises provider (visionroute.vision.local) serves: ImageNet tags, and OCR through Tesseract
(whether Tesseract is installed is checked when the route runs)."""


class CannotDecide(ValueError):
    """The spec is valid but no route can serve it; the message says what to provide."""


@dataclass(frozen=True)
class DataSummary:
    """What the rules need to know about the labelled data (counted from data.path, or declared)."""

    labeled_examples: int = 0
    per_class: dict[str, int] | None = None
    domain_measurement: dict | None = None
    """From visionroute.data.domain: at least `far` (bool) and `sentence` (for the reasons)."""
    native_size: int = 0
    """Median short side of the images in px (0: unknown); 28-64 px data trains natively on a small-input CNN."""


@dataclass
class Decision:
    route: str
    rule: str
    reasons: list[str]
    provider: str | None = None
    model: str | None = None
    rejected: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    costs: dict = field(default_factory=dict)
    forced: bool = False
    auto_rule: str | None = None
    """With a forced route: the rule that would have applied."""
    inputs: dict = field(default_factory=dict)
    escalation: dict | None = None
    """Set when the flow escalated from a Vision API that missed its target accuracy (see `escalate`)."""
    evaluation: dict | None = None
    """Set by the flow once the images are checked: the test split's origin, size and leakage handling
    (`planning.evaluation_plan`)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Verdict:
    route: Route
    rule: str
    reasons: list[str]
    provider: str | None = None
    warnings: list[str] = field(default_factory=list)


def _models(spec: TaskSpec, examples: int, native_size: int, device: str) -> tuple[str, str]:
    """(finetune model, scratch model): the named one, else the auto choice for the device that will train.
    This is the model the training route trains (it is priced and trained from one choice)."""
    if spec.training.model != "auto":
        return spec.training.model, spec.training.model
    budget = spec.training.budget_minutes
    hub = False  # nothing is downloaded at run time unless VISIONROUTE_ALLOW_HUB: price what can be trained
    return (
        choose_model("finetune", examples, budget, device=device, hub=hub, native_size=native_size),
        choose_model("scratch", examples, budget, device=device, hub=hub, native_size=native_size),
    )


def _self_hosted_cost(spec: TaskSpec, examples: int, costs: dict, prices: Prices, policy: Policy) -> float:
    """Monthly cost of our own model: fine-tuned when there are labels, a pretrained one served as-is if not."""
    return self_hosted_monthly(
        prices,
        costs["finetune"]["model"],
        "finetune" if examples else None,
        examples,
        spec.constraints.monthly_volume,
        policy.amortisation_months,
    )


def api_task(spec: TaskSpec) -> Task | None:
    """What a Vision API would be asked for this task, or None when no API can serve it."""
    if spec.is_generic:
        return spec.task
    return Task.tag if spec.classify_by_api else None


def _generic(spec: TaskSpec, examples: int, costs: dict, prices: Prices, policy: Policy) -> _Verdict:
    task, volume = spec.task.value, spec.constraints.monthly_volume
    api = costs["vision_api"]
    if not spec.constraints.external_api_allowed:
        why = "images must not leave the premises (external_api_allowed: false)"
        suffix = "private"
    else:
        self_cost = _self_hosted_cost(spec, examples, costs, prices, policy)
        if cheapest_provider(prices, spec.task, volume)[1] <= self_cost:  # unrounded, as break-even is
            return _Verdict(
                Route.vision_api,
                "generic-api",
                [
                    f"'{task}' is a generic task that cloud Vision APIs already do well.",
                    f"At {volume:,} images/month the cheapest API ({api['provider']}) costs "
                    f"${api['monthly_usd']:,.2f}/month, below self-hosting at ${self_cost:,.2f}/month.",
                ],
                provider=api["provider"],
            )
        why = (
            f"at {volume:,} images/month the API bill (${api['monthly_usd']:,.2f}) exceeds self-hosting "
            f"(${self_cost:,.2f}/month)"
        )
        suffix = "cost"
    if examples:
        return _Verdict(
            Route.finetune,
            f"generic-{suffix}-finetune",
            [
                f"'{task}' is generic, but {why}.",
                f"{examples:,} labelled images allow a custom model on premises.",
            ],
        )
    if spec.task in LOCAL_TASKS:
        return _Verdict(
            Route.vision_api,
            f"generic-{suffix}-local",
            [
                f"'{task}' is generic, but {why}.",
                "With no labelled data, a pretrained model runs on premises.",
            ],
            provider=LOCAL_PROVIDER,
        )
    served = ", ".join(sorted(t.value for t in LOCAL_TASKS))
    if suffix == "private":
        raise CannotDecide(
            f"'{task}' must stay on premises (external_api_allowed: false), but the on-premises provider serves "
            f"{served} only and there is no labelled data to train a model: label images (data.path with one "
            "folder per class) or allow external APIs"
        )
    return _Verdict(
        Route.vision_api,
        "generic-cost-api",
        [
            f"'{task}' is generic; {why}, but no on-premises model serves it without labelled data.",
            f"The cheapest API ({api['provider']}) is used at ${api['monthly_usd']:,.2f}/month.",
        ],
        provider=api["provider"],
        warnings=[
            f"self-hosting would be cheaper at {volume:,} images/month; label images (data.path) to train a "
            f"custom '{task}' model, or lower the volume"
        ],
    )


def _label_map_api(
    spec: TaskSpec, examples: int, costs: dict, prices: Prices, policy: Policy
) -> _Verdict | None:
    """A classify task whose classes map onto generic labels goes to the API when images may leave, no
    custom model is proven necessary and the API is cheaper; the flow's fit test then checks the accuracy."""
    if not spec.constraints.external_api_allowed or spec.constraints.proven_need:
        return None
    api = costs["vision_api"]
    self_cost = _self_hosted_cost(spec, examples, costs, prices, policy)
    if cheapest_provider(prices, Task.tag, spec.constraints.monthly_volume)[1] > self_cost:
        return None
    target = spec.vision_api.target_accuracy
    return _Verdict(
        Route.vision_api,
        "specific-label-map-api",
        [
            "vision_api.label_map maps every class onto labels a generic Vision API already returns.",
            f"At {spec.constraints.monthly_volume:,} images/month the cheapest API ({api['provider']}) costs "
            f"${api['monthly_usd']:,.2f}/month, below a custom model at ${self_cost:,.2f}/month.",
            f"The flow runs a fit test on a labelled sample first and escalates to training below "
            f"target_accuracy {target}."
            if target
            else "No target_accuracy is set, so the API is used as mapped; run `visionroute fit-test` to measure it.",
        ],
        provider=api["provider"],
    )


def _images(spec: TaskSpec) -> str:
    return "these images (domain measured)" if spec.domain == Domain.auto else f"'{spec.domain.value}' images"


def _specific(spec: TaskSpec, examples: int, policy: Policy, far: bool) -> _Verdict:
    enough = policy.sufficient_for_scratch
    if spec.constraints.proven_need:
        if examples >= enough:
            return _Verdict(
                Route.scratch,
                "proven-need-scratch",
                [
                    "A custom model is proven necessary at production scale (proven_need: true).",
                    f"{examples:,} labelled images (>= {enough:,}) are enough to train from scratch.",
                ],
            )
        verdict = _specific(
            spec.model_copy(
                update={"constraints": spec.constraints.model_copy(update={"proven_need": False})}
            ),
            examples,
            policy,
            far,
        )
        verdict.rule = (
            "proven-need-insufficient-finetune" if verdict.route == Route.finetune else verdict.rule
        )
        verdict.warnings.append(
            f"proven_need is set, but {examples:,} labelled images are fewer than the {enough:,} that justify "
            "training from scratch; fine-tuning instead. Collect more labels to revisit."
        )
        return verdict
    domain = spec.domain
    if not far:
        warnings = []
        if domain == Domain.other:
            warnings.append(
                "domain 'other' is treated as ImageNet-like until it can be measured; declare the domain if "
                "it is radar, microscopy or volumetric."
            )
        size = "limited" if examples < policy.limited_data else "plentiful"
        return _Verdict(
            Route.finetune,
            "specific-imagenet-like-finetune",
            [
                "Classifying the team's own classes is a specific task no generic API serves.",
                f"{_images(spec)} are ImageNet-like, so ImageNet features transfer; with {size} data "
                f"({examples:,} labelled) fine-tuning a pretrained CNN is the efficient route.",
            ],
            warnings=warnings,
        )
    if examples < enough:
        return _Verdict(
            Route.finetune,
            "specific-far-small-finetune",
            [
                f"{_images(spec)} are far from ImageNet, but {examples:,} labelled images "
                f"(< {enough:,}) are too few to train from scratch.",
            ],
            warnings=[
                f"ImageNet features may transfer weakly to {_images(spec)}; prefer a domain-pretrained "
                "checkpoint (training.checkpoint) when one is registered."
            ],
        )
    checkpoint = policy.domain_checkpoints.get(domain)
    if checkpoint:
        return _Verdict(
            Route.finetune,
            "specific-far-large-domain-finetune",
            [
                f"{_images(spec)} are far from ImageNet and {examples:,} labelled images would allow "
                f"scratch, but a domain-pretrained checkpoint is registered ({checkpoint}); fine-tuning it "
                "is cheaper and starts closer.",
            ],
        )
    return _Verdict(
        Route.scratch,
        "specific-far-large-scratch",
        [
            f"{_images(spec)} are far from ImageNet, so ImageNet features help little.",
            f"{examples:,} labelled images (>= {enough:,}) are enough to train a CNN from scratch.",
        ],
    )


def _rejections(
    chosen: Route, spec: TaskSpec, costs: dict, examples: int, policy: Policy, far: bool
) -> list[dict]:
    """Why each route other than `chosen` was not taken, in words specific to this task."""
    enough = policy.sufficient_for_scratch
    api = costs["vision_api"]
    if not api["applicable"]:
        api_why = api["why"]
    elif not spec.constraints.external_api_allowed:
        api_why = "images may not leave the premises (external_api_allowed: false)"
    elif chosen == Route.vision_api:
        api_why = ""
    else:
        api_why = (
            f"${api['monthly_usd']:,.2f}/month at {spec.constraints.monthly_volume:,} images is more than "
            f"self-hosting (${costs.get('self_hosted_monthly_usd', 0):,.2f}/month)"
        )
    if not examples:
        finetune_why = scratch_why = "no labelled data to train on"
    else:
        finetune_why = (
            f"the {api.get('provider')} API already does this generic task at "
            f"${api.get('monthly_usd', 0):,.2f}/month"
            if chosen == Route.vision_api and spec.is_generic
            else f"{_images(spec)} are far from ImageNet and {examples:,} labelled images (>= {enough:,}) "
            "support training from scratch"
            if far or spec.constraints.proven_need
            else "not needed"
        )
        scratch_why = (
            f"{examples:,} labelled images are fewer than the {enough:,} scratch needs"
            if examples < enough
            else f"ImageNet features transfer to {_images(spec)}; fine-tuning gets there cheaper"
            if not far and not spec.constraints.proven_need
            else "a generic task that the API already serves"
            if chosen == Route.vision_api
            else "a registered domain-pretrained checkpoint starts closer"
        )
    why = {Route.vision_api: api_why, Route.finetune: finetune_why, Route.scratch: scratch_why}
    return [{"route": route.value, "why": why[route]} for route in Route if route != chosen]


def _resolve_domain(
    spec: TaskSpec, summary: DataSummary, policy: Policy
) -> tuple[bool, list[str], list[str]]:
    """(far from ImageNet?, reasons, warnings): measured for domain auto, declared otherwise, and a warning
    when a measurement contradicts the declared domain."""
    measured = summary.domain_measurement
    if spec.domain == Domain.auto:
        if measured is None:
            raise CannotDecide(
                "domain: auto needs the images measured: give data.path (the flow and `visionroute decide` "
                "measure it), or declare the domain"
            )
        return bool(measured["far"]), [measured["sentence"]], []
    declared_far = policy.is_far(spec.domain)
    if measured is None or bool(measured["far"]) == declared_far:
        return declared_far, ([measured["sentence"]] if measured else []), []
    side = "far from ImageNet" if measured["far"] else "ImageNet-like"
    return (
        declared_far,
        [measured["sentence"]],
        [
            f"the declared domain '{spec.domain.value}' is {'far from ImageNet' if declared_far else 'ImageNet-like'} "
            f"but the images measure {side}; the declared domain was used. Set domain: auto to follow the measurement."
        ],
    )


def _class_checks(summary: DataSummary, policy: Policy) -> tuple[list[str], list[str]]:
    """(errors, warnings) about per-class counts, for training routes."""
    if not summary.per_class:
        return [], []
    errors, warnings = [], []
    if len(summary.per_class) < 2:
        errors.append(
            f"only one class ({', '.join(summary.per_class)}) in the data; add a folder per class, at least two"
        )
    for name, count in sorted(summary.per_class.items()):
        if count < policy.min_per_class:
            errors.append(
                f"class '{name}' has {count} labelled image(s); at least {policy.min_per_class} are needed to "
                "train — add images or drop the class"
            )
        elif count < policy.warn_per_class:
            warnings.append(
                f"class '{name}' has {count} labelled images; fine-tuning works best with a few hundred per class"
            )
    return errors, warnings


_PROVIDER_SETTINGS = {
    "transport": ("google", "grpc"),
    "ocr_mode": ("google", "text"),
    "region": ("aws", None),
    "s3_bucket": ("aws", None),
}


def _ignored_settings(spec: TaskSpec, provider: str | None) -> list[str]:
    """Warnings for vision_api settings that the chosen provider does not read."""
    return [
        f"vision_api.{name} applies to provider {owner} only; it is ignored for {provider}"
        for name, (owner, default) in _PROVIDER_SETTINGS.items()
        if provider != owner and getattr(spec.vision_api, name) != default
    ]


def _named_provider(spec: TaskSpec, provider: str | None, prices: Prices) -> tuple[str | None, str | None]:
    """The provider the spec names (vision_api.provider) instead of the cheapest; refused when it would send
    images out against external_api_allowed: false, or does not offer the feature."""
    named = spec.vision_api.provider
    if named == "auto" or named == provider:
        return provider, None
    if named == LOCAL_PROVIDER:
        return named, "vision_api.provider names local: images are annotated on premises."
    if not spec.constraints.external_api_allowed:
        raise CannotDecide(
            f"vision_api.provider is '{named}', but external_api_allowed is false: images may not leave the "
            "premises. Set vision_api.provider to local or auto, or allow external APIs"
        )
    feature = api_task(spec)
    if prices.api_price(named, feature) is None:
        offering = [p for p in prices.providers if prices.api_price(p, feature) is not None]
        raise CannotDecide(
            f"vision_api.provider '{named}' does not offer '{feature.value}'; choose one of {offering + ['local']}"
        )
    return named, f"vision_api.provider names '{named}' (the cheapest would be '{provider}')."


def escalate(
    decision: Decision,
    fit: dict,
    spec: TaskSpec,
    summary: DataSummary,
    prices: Prices,
    policy: Policy = DEFAULT_POLICY,
) -> Decision:
    """The decision after a Vision API missed `vision_api.target_accuracy` in the fit test: the route the
    rules give without the label_map (a trained model), with the fit figures recorded as the reason. It plans
    training for the device `decision` planned for."""
    without_map = spec.model_copy(
        update={
            "route": "auto",  # a forced vision_api route is what failed: let the rules choose the training route
            "vision_api": spec.vision_api.model_copy(update={"label_map": None, "target_accuracy": None}),
        }
    )
    trained = decide(without_map, summary, prices, policy, device=decision.inputs["training_device"])
    trained.auto_rule = trained.rule
    trained.rule = f"escalated-{trained.route}"
    trained.reasons = [
        f"The {fit['provider']} API reached accuracy {fit['accuracy']:.3f} on a {fit['images']}-image fit test, "
        f"below target_accuracy {spec.vision_api.target_accuracy}; escalated to {trained.route}.",
        *trained.reasons,
    ]
    trained.escalation = {
        "from_route": decision.route,
        "from_rule": decision.rule,
        "provider": fit["provider"],
        "fit_accuracy": fit["accuracy"],
        "target_accuracy": spec.vision_api.target_accuracy,
        "fit_images": fit["images"],
        "fit_run_id": fit.get("run_id"),
    }
    return trained


def decide(
    spec: TaskSpec,
    summary: DataSummary | None = None,
    prices: Prices | None = None,
    policy: Policy = DEFAULT_POLICY,
    *,
    device: str = "gpu",
) -> Decision:
    """Choose the route for `spec`. Raises CannotDecide when no route can serve it.

    `device`: what the training will run on, one of catalogue.TRAINING_DEVICES: the flow knows (a CPU that
    trains in bf16 fits larger models in a budget than one in fp32); `visionroute decide` plans for a GPU."""
    from visionroute.decision.costs import load_prices  # reads the bundled file once, then cached

    prices = prices or load_prices()
    check_training_device(device)
    declared = spec.data.labeled_examples if spec.data else None
    summary = summary or DataSummary(labeled_examples=declared or 0)
    examples = summary.labeled_examples
    finetune_model, scratch_model = _models(spec, examples, summary.native_size, device)
    costs = route_costs(
        prices,
        spec.task,
        examples,
        spec.constraints.monthly_volume,
        finetune_model=finetune_model,
        scratch_model=scratch_model,
        amortisation_months=policy.amortisation_months,
        api_task=api_task(spec),
    )

    far, domain_notes, domain_warnings = _resolve_domain(spec, summary, policy)
    by_label_map = _label_map_api(spec, examples, costs, prices, policy) if spec.classify_by_api else None
    if spec.is_generic:
        verdict = _generic(spec, examples, costs, prices, policy)
    elif by_label_map is not None:
        verdict = by_label_map
    elif examples == 0:
        raise CannotDecide(
            f"task '{spec.name}' classifies into the team's own classes but has no labelled data: set data.path "
            "to a folder with one sub-folder of images per class (or a .npz), or give data.labeled_examples"
        )
    else:
        verdict = _specific(spec, examples, policy, far)

    route, rule, reasons, provider = verdict.route, verdict.rule, list(verdict.reasons), verdict.provider
    reasons += domain_notes if not spec.is_generic else []
    warnings = list(verdict.warnings) + domain_warnings
    forced = spec.route != "auto" and Route(spec.route) != verdict.route
    if forced:
        route, provider = Route(spec.route), None
        rule = f"forced-{route.value}"
        reasons = [
            f"route '{route.value}' was forced in the spec and is honoured.",
            f"The framework would have chosen '{verdict.route.value}' (rule {verdict.rule}): "
            + " ".join(verdict.reasons),
        ]
        if route == Route.vision_api:
            if not spec.constraints.external_api_allowed:
                provider = LOCAL_PROVIDER
                warnings.append("external APIs are not allowed, so the forced vision_api route runs locally")
            elif api_task(spec) is None:
                raise CannotDecide(
                    "route 'vision_api' was forced, but no Vision API knows the team's own classes; "
                    "give vision_api.label_map, or use route auto, finetune or scratch"
                )
            else:
                provider = costs["vision_api"]["provider"]
        if route != Route.vision_api and not examples:
            raise CannotDecide(
                f"route '{route.value}' was forced but there is no labelled data to train on; set data.path"
            )
        if route == Route.scratch and examples < policy.sufficient_for_scratch:
            warnings.append(
                f"training from scratch on {examples:,} labelled images (< {policy.sufficient_for_scratch:,}) "
                "usually underperforms fine-tuning"
            )

    if route == Route.vision_api:
        provider, note = _named_provider(spec, provider, prices)
        reasons += [note] if note else []
        if provider == LOCAL_PROVIDER and api_task(spec) not in LOCAL_TASKS:
            raise CannotDecide(
                f"the on-premises provider serves {', '.join(sorted(t.value for t in LOCAL_TASKS))} only, not "
                f"'{api_task(spec).value}'; allow external APIs or name a cloud provider in vision_api.provider"
            )
        warnings += _ignored_settings(spec, provider)
    else:
        errors, class_warnings = _class_checks(summary, policy)
        if errors:
            raise CannotDecide("; ".join(errors))
        warnings += class_warnings

    if spec.classify_by_api and route != Route.vision_api and not spec.constraints.external_api_allowed:
        warnings.append(
            "vision_api.label_map is not used: images may not leave the premises, and the on-premises tagger's "
            "ImageNet labels are not mapped to classes"
        )

    model = {Route.finetune: finetune_model, Route.scratch: scratch_model}.get(route)
    return Decision(
        route=route.value,
        rule=rule,
        reasons=reasons,
        provider=provider,
        model=model,
        rejected=_rejections(route, spec, costs, examples, policy, far),
        warnings=warnings,
        costs=costs,
        forced=forced,
        auto_rule=verdict.rule if forced else None,
        inputs={
            "task": spec.task.value,
            "generic": spec.is_generic,
            "domain": spec.domain.value,
            "far_from_imagenet": far,
            "domain_measurement": summary.domain_measurement,
            "labeled_examples": examples,
            "per_class": summary.per_class,
            "monthly_volume": spec.constraints.monthly_volume,
            "external_api_allowed": spec.constraints.external_api_allowed,
            "proven_need": spec.constraints.proven_need,
            "training_device": device,  # what the auto model choice planned for
        },
    )
