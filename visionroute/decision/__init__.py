"""The decision framework: which route serves an image task, and why.

Pure Python (no Prefect, no MLflow): `rules` holds every rule, `policy` every threshold, `costs` the cost model
over `prices.yaml`, `report` how a decision reads for a person.
"""

from visionroute.decision.rules import CannotDecide, DataSummary, Decision, decide, escalate

__all__ = ["CannotDecide", "DataSummary", "Decision", "decide", "escalate"]
