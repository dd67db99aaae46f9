"""Finish or undo what a killed process left behind: RUNNING runs of dead processes become KILLED (tagged
`visionroute.killed`), and model versions that never finished their promotion step are deleted (or marked
ready when `champion` already points at them). Run by the route flow before each task, and by
`visionroute repair`."""

from __future__ import annotations

from visionroute import tracking


def repair(tasks: list[str] | None = None) -> list[dict]:
    """Repair the named tasks (experiments and registered models), or every one in the store."""
    from visionroute import model_registry

    client = tracking.check_store()
    if tasks is None:
        tasks = sorted(
            {e.name for e in client.search_experiments()}
            | {m.name for m in client.search_registered_models()}
        )
    actions = tracking.repair_runs(client, tasks)
    for name in tasks:
        if client.search_registered_models(f"name = '{name}'"):
            actions += model_registry.repair_versions(
                client, name, lambda run_id: tracking.run_is_live(client, run_id)
            )
    return actions
