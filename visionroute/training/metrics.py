"""Classification metrics and the confusion-matrix picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


Z95 = 1.959964
"""Two-sided 95% normal quantile for the Wilson intervals."""


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): unlike the normal approximation it stays
    inside [0, 1] and is honest on small splits (10/10 correct gives [0.72, 1.0], not [1.0, 1.0])."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return round(float(max(0.0, centre - half)), 4), round(float(min(1.0, centre + half)), 4)


def format_accuracy(report: dict) -> str:
    """'0.9520 (95% CI 0.92-0.97, 270 images)': how a test accuracy is shown everywhere."""
    low, high = report["accuracy_ci95"]
    return f"{report['accuracy']:.4f} (95% CI {low:.2f}-{high:.2f}, {report['examples']} images)"


def classification_report(labels, predictions, classes: list[str]) -> dict:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    matrix = confusion_matrix(labels, predictions, len(classes))
    true_positive = np.diag(matrix).astype(float)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(true_positive), where=denominator > 0
    )
    present = support > 0
    return {
        "accuracy": float(true_positive.sum() / max(1, len(labels))),
        "accuracy_ci95": list(wilson_interval(int(true_positive.sum()), len(labels))),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
        "examples": int(len(labels)),
    }


def plot_confusion_matrix(matrix, classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    size = max(4.0, 0.6 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), value in np.ndenumerate(matrix):
        colour = "white" if value > threshold else "black"
        axes.text(column, row, str(value), ha="center", va="center", color=colour)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def roc_auc(labels, scores) -> float | None:
    """Area under the ROC curve for the positive class (label 1), ties counted half (Mann-Whitney U)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    positives, negatives = int((labels == 1).sum()), int((labels != 1).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over tied scores.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def binary_threshold(labels, scores) -> float:
    """The probability threshold for class 1 that maximises balanced accuracy on these (validation) labels;
    among equally good ones, the closest to 0.5. Balanced, so a rare class is not thresholded away."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    if len(np.unique(labels)) < 2:
        return 0.5
    candidates = np.unique(np.concatenate([scores, [0.5]]))
    best, best_score = 0.5, -1.0
    for threshold in candidates:
        predicted = scores >= threshold
        score = 0.5 * (predicted[labels == 1].mean() + (~predicted[labels != 1]).mean())
        if score > best_score + 1e-12 or (
            abs(score - best_score) <= 1e-12 and abs(threshold - 0.5) < abs(best - 0.5)
        ):
            best, best_score = float(threshold), score
    return best
