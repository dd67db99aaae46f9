"""Every threshold of the decision framework, in one documented object.

The numbers come from the project's design document (see README, "How a route is chosen"). Change them here,
or pass another `Policy` to `decide`, never inline in the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from visionroute.spec import Domain


@dataclass(frozen=True)
class Policy:
    limited_data: int = 10_000
    """Under this many labelled examples the data is "limited" (fine-tuning territory)."""
    sufficient_for_scratch: int = 20_000
    """At least this many labelled examples is "tens of thousands": enough to train from scratch."""
    min_per_class: int = 5
    """Fewer labelled images than this in any class is an error for a training route."""
    warn_per_class: int = 100
    """Fewer than this per class gets a warning: fine-tuning wants a few hundred images per class."""
    imagenet_like: frozenset[Domain] = frozenset(
        {Domain.natural, Domain.product, Domain.document, Domain.medical, Domain.satellite, Domain.industrial}
    )
    """Domains where ImageNet features transfer (product photos, medical, satellite, defect detection)."""
    far_from_imagenet: frozenset[Domain] = frozenset({Domain.radar, Domain.microscopy, Domain.volumetric})
    """Domains where ImageNet features transfer poorly; `other` is neither and is treated as ImageNet-like."""
    domain_checkpoints: dict[Domain, str] = field(default_factory=dict)
    """Registered domain-pretrained checkpoints (e.g. {radar: "models:/radar-backbone@champion"}).
    A far domain with enough data fine-tunes from one of these instead of training from scratch."""
    amortisation_months: int = 12
    """Training cost is spread over this many months when compared with a monthly API bill."""
    min_test_images: int = 30
    """A test split smaller than this decides nothing (one image is over 3 points of accuracy): the version is
    registered as challenger only, never champion."""
    min_test_per_class: int = 5
    """Likewise for any class with fewer test images than this."""

    def is_far(self, domain: Domain) -> bool:
        return domain in self.far_from_imagenet

    def test_split_problem(self, per_class: dict[str, int]) -> str | None:
        """Why a test split with these counts per class cannot choose a champion; None when it can."""
        total = sum(per_class.values())
        small = {name: count for name, count in per_class.items() if count < self.min_test_per_class}
        if total >= self.min_test_images and not small:
            return None
        what = f"{total} image(s)" + (f", {small} in the smallest class(es)" if small else "")
        return (
            f"the test split has {what}, under the minimum of {self.min_test_images} images and "
            f"{self.min_test_per_class} per class, so it cannot tell models apart: add test images "
            f"(a larger test/ folder, or no split folders so visionroute holds out 15% of each class) or "
            f"more labelled images"
        )


DEFAULT_POLICY = Policy()
