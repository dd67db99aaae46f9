"""The `predict` Prefect flow: label a folder of images with a registered model, as `visionroute predict` does."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from visionroute import tracking


@flow(name="predict", log_prints=True)
def predict_images(
    model: str = "models:/ants-vs-bees@champion",
    images: str = "examples/data/ants_bees/val",
    out: str = "",
    top_k: int = 3,
) -> dict:
    """Label images with a registered model; one JSON line per image in a file, a summary table in the run.

    Args:
        model: The registered model to use: models:/NAME@champion (the reviewed one), models:/NAME@challenger,
            or models:/NAME/VERSION.
        images: An image file or a folder of images on the worker, relative to the repository root.
        out: Where to write the JSON lines (default: predictions/ in the state folder, named after the run).
        top_k: How many best labels to keep per image.
    """
    source = Path(images)
    if not source.exists():
        raise ValueError(
            f"{images}: no such file or folder on the worker; give a path relative to {Path.cwd()}"
        )
    if not out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = str(
            tracking.state_dir() / "predictions" / f"{model.split('/')[-1].replace('@', '-')}-{stamp}.jsonl"
        )
    from visionroute.predict import predict_paths  # torch: imported by a run, not by `prefect deploy`

    rows = predict_paths(model, [source], out, top_k=top_k)
    labelled = [row for row in rows if "label" in row]
    counts = Counter(row["label"] for row in labelled)
    create_table_artifact(
        key="predict-results",
        table=[
            {
                "path": row["path"],
                "label": row.get("label", ""),
                "score": row.get("score", ""),
                "error": row.get("error", ""),
            }
            for row in rows[:500]
        ],
        description=f"{model}: {len(labelled)} of {len(rows)} image(s) labelled ({dict(counts)}); all rows in {out}"
        + (" (first 500 shown)" if len(rows) > 500 else ""),
    )
    get_run_logger().info("%d of %d image(s) labelled; written to %s", len(labelled), len(rows), out)
    return {"out": out, "images": len(rows), "labelled": len(labelled), "per_label": dict(counts)}
