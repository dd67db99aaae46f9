"""Label new images with a registered model, using the preprocessing it was trained with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from visionroute import tracking
from visionroute.data.images import IMAGE_SUFFIXES, ImageRejected, load_rgb


def _expand(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def predict_paths(
    model_uri: str, paths: list[Path], out: str | None = None, top_k: int = 3, batch_size: int = 16
) -> list[dict]:
    """One row per image: path, sha256, label, score, top-k; unreadable images get `error` and no label."""
    import mlflow.pytorch

    from visionroute.model_registry import load_preprocessing, require_ready
    from visionroute.training.engine import forward_eval

    require_ready(tracking.configure(), model_uri)
    try:
        prep = load_preprocessing(model_uri)
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")  # a torch.export graph, eval mode
    except Exception as error:  # MLflow raises several types for an unknown name, version or alias
        raise ValueError(f"cannot load model {model_uri} from {tracking.tracking_uri()}: {error}") from None
    rows: list[dict] = []
    pending: list[tuple[dict, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        # As the model was scored (no_grad, and bf16 on a CPU with bf16 instructions: engine.precision).
        logits = forward_eval(model, torch.cat([x for _, x in pending]))
        probabilities, labels = logits.softmax(-1), prep.decide(logits)  # the validation-chosen threshold too
        for (row, _), p, label in zip(pending, probabilities, labels, strict=True):
            scores, indices = p.topk(min(top_k, len(prep.classes)))
            row["label"] = prep.classes[int(label)]
            row["score"] = round(float(p[int(label)]), 6)
            row["top_k"] = [
                {"label": prep.classes[int(i)], "score": round(float(s), 6)}
                for s, i in zip(scores, indices, strict=True)
            ]
        pending.clear()

    for path in _expand(paths):
        row: dict = {"path": str(path)}
        rows.append(row)
        try:
            row["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            pending.append((row, prep.eval_input(load_rgb(path))))
        except (ImageRejected, OSError) as error:
            row["error"] = str(error)
        if len(pending) >= batch_size:
            flush()
    flush()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows
