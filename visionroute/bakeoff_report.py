"""The bake-off as a table and a picture: each trained route's test figures, the framework's choice beside the
measured winner. Pure (matplotlib only): the `bakeoff` flow publishes what these return."""

from __future__ import annotations

from pathlib import Path


def bakeoff_rows(outcomes: list[dict], framework_choice: str) -> list[dict]:
    """One row per route from the backends' results (route, metrics, model, version, promoted)."""
    rows = []
    for outcome in outcomes:
        metrics = outcome["metrics"]
        rows.append(
            {
                "route": outcome["route"],
                "model": outcome.get("model", ""),
                "test_accuracy": round(metrics.get("test_accuracy", 0.0), 4),
                "test_balanced_accuracy": round(metrics.get("test_balanced_accuracy", 0.0), 4),
                "test_auc": round(metrics["test_auc"], 4) if "test_auc" in metrics else None,
                "train_seconds": round(metrics.get("train_seconds", 0.0), 1),
                "version": outcome.get("model_version"),
                "promoted": outcome.get("promoted", False),
                "framework_choice": outcome["route"] == framework_choice,
            }
        )
    return rows


def measured_winner(rows: list[dict]) -> str:
    """Best test accuracy; a tie goes to the faster route (the same answer for less compute)."""
    return max(rows, key=lambda row: (row["test_accuracy"], -row["train_seconds"]))["route"]


def verdict(rows: list[dict], framework_choice: str) -> str:
    winner = measured_winner(rows)
    figures = ", ".join(f"{row['route']} {row['test_accuracy']:.4f}" for row in rows)
    if winner == framework_choice:
        return f"The framework chose {framework_choice}, and it won on the test split ({figures})."
    return (
        f"The framework chose {framework_choice}, but {winner} measured better on the same test split "
        f"({figures}); the better model is champion. Consider forcing route: {winner} for this task."
    )


def plot_bakeoff(rows: list[dict], framework_choice: str, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    winner = measured_winner(rows)
    figure, (accuracy, seconds) = plt.subplots(1, 2, figsize=(9, 3.8))
    names = [f"{row['route']}\n{row['model']}" for row in rows]
    colours = ["tab:green" if row["route"] == winner else "tab:grey" for row in rows]
    bars = accuracy.bar(names, [row["test_accuracy"] for row in rows], color=colours)
    for bar, row in zip(bars, rows, strict=True):
        label = f"{row['test_accuracy']:.3f}" + ("\nframework's choice" if row["framework_choice"] else "")
        accuracy.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
        )
    accuracy.set_ylim(0, 1.15)
    accuracy.set_ylabel("test accuracy (same split)")
    seconds.bar(names, [row["train_seconds"] for row in rows], color=colours)
    seconds.set_ylabel("training seconds")
    figure.suptitle(f"{title}: measured winner {winner} (green)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
