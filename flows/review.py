"""The `review-model` Prefect flow: a person moves `champion` to a version, or rolls it back, with a reason."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from visionroute import review, tracking


@flow(name="review-model")
def review_model(
    name: str = "ants-vs-bees",
    version: str = "",
    action: Literal["promote", "rollback"] = "promote",
    reviewer: str = "",
    reason: str = "",
) -> dict:
    """Promote a registered version to champion, or roll champion back; recorded with who, when and why.

    Args:
        name: The registered model (the task's name), e.g. ants-vs-bees.
        version: The version number to promote (as MLflow lists it); leave empty for a rollback.
        action: promote: make this version champion; rollback: give champion back to the version it replaced.
        reviewer: Who decides (your name); recorded on the version and in the alias history.
        reason: Why, in a sentence; recorded on the version and in the alias history.
    """
    client = tracking.configure()
    if action == "promote":
        if not version:
            raise review.ReviewError("promote needs the version number to make champion")
        entry = review.promote(client, name, version, reviewer, reason)
    else:
        entry = review.rollback(client, name, reviewer, reason)
    get_run_logger().info(
        "%s: champion v%s -> v%s by %s (%s)", name, entry["previous"], entry["version"], reviewer, reason
    )
    create_markdown_artifact(
        key=f"{name}-review",
        markdown=review.history_markdown(client, name),
        description=f"{name}: champion is now v{entry['version']} ({action} by {reviewer})",
    )
    return entry
