"""The nightly `reevaluate-champions` Prefect flow: is each champion still as good as when it was crowned?"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from visionroute import tracking


@flow(name="reevaluate-champions")
def reevaluate_champions(names: list[str] | None = None, max_drop: float = 0.05) -> list[dict]:
    """Re-score every champion on its saved test split and on labelled images added since; record the drift
    in MLflow and raise an alert artifact for each champion whose accuracy dropped.

    Args:
        names: Registered models to check (empty: every model that has a champion).
        max_drop: Alert when accuracy falls more than this below the figure recorded at registration (0.05 = 5 points).
    """
    from visionroute.reevaluation import champions, reevaluate  # torch: imported by a run, not by deploys

    client = tracking.configure()
    logger = get_run_logger()
    reports = []
    for name in names or champions(client):
        report = reevaluate(client, name, max_drop)
        reports.append(report)
        logger.info("%s v%s: %s", name, report["version"], report)
        if report["dropped"]:
            create_markdown_artifact(
                key=f"{name}-drift-alert",
                markdown=f"# {name} v{report['version']}: accuracy dropped\n\n"
                f"Recorded at registration: **{report['recorded_test_accuracy']:.4f}**. Now: test split "
                f"**{report.get('test_accuracy', float('nan')):.4f}** ({report['test_images']} images), new labelled "
                f"data **{report.get('new_data_accuracy', float('nan')):.4f}** ({report['new_images']} images). "
                f"Alert threshold: a drop of more than {max_drop}. MLflow run `{report['run_id']}`. Retrain "
                "(route-image-task) and review the new version (review-model).",
                description=f"{name}: champion accuracy dropped",
            )
    create_table_artifact(
        key="reevaluation",
        table=[{k: v for k, v in r.items() if k != "run_id"} for r in reports],
        description="Champions re-scored on their saved test split and on new labelled data",
    )
    return reports
