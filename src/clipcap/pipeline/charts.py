"""The evaluate stage's pictures, PNGs beside ``metrics.json``: each system's test scores with their 95 %
intervals, and the learning curve (validation loss and CIDEr per epoch). The gallery shows them, the
register stage logs them to the MLflow run, ``dvc plots show`` lists them."""

from __future__ import annotations

from pathlib import Path

from clipcap.fileio import write_atomic
from clipcap.pipeline.reports import series

METRICS = ("CIDEr", "BLEU-4", "METEOR", "names_object")
SYSTEM_NAMES = {"model": "model", "baseline_retrieval": "retrieval", "baseline_label": "label",
                "baseline_most_frequent": "most frequent"}


def score_table(metrics: dict) -> dict[str, dict[str, tuple[float, float, float]]]:
    """System (its short name) -> metric -> (score, interval low, interval high), from ``metrics.json``'s
    content; a metric without an interval gets the score at both ends."""
    table = {}
    for key, name in SYSTEM_NAMES.items():
        if key not in metrics:
            continue
        interval = metrics.get("ci95", {}).get(key, {})
        table[name] = {}
        for metric in METRICS:
            if metric in metrics[key]:
                score = float(metrics[key][metric])
                low, high = interval.get(metric, (score, score))
                table[name][metric] = (score, float(low), float(high))
    return table


def _chart(path: Path, title: str, draw) -> None:
    """An 800 x 400 PNG at ``path`` (written whole), titled ``title``: ``draw(axes)`` fills it."""
    import matplotlib

    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    try:
        draw(ax)
        ax.set_title(title)
        fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def write_score_chart(table: dict, path: Path, title: str) -> None:
    """Grouped bars, one group per metric, one bar per system, each with its 95 % interval."""
    metrics = [m for m in METRICS if any(m in scores for scores in table.values())]
    width = 0.8 / max(len(table), 1)

    def draw(ax) -> None:
        for n, (system, scores) in enumerate(table.items()):
            xs = [i + (n - (len(table) - 1) / 2) * width for i, m in enumerate(metrics) if m in scores]
            values = [scores[m] for m in metrics if m in scores]
            heights = [v[0] for v in values]
            # a bootstrap interval of a corpus-level score need not hold the score itself: no bar below zero
            errors = [[max(v[0] - v[1], 0.0) for v in values], [max(v[2] - v[0], 0.0) for v in values]]
            ax.bar(xs, heights, width, yerr=errors, capsize=3, label=system)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_ylabel("score on the test split (95 % interval)")
        ax.legend(frameon=False)

    _chart(path, title, draw)


def write_curve_chart(curve: list[dict[str, float]], path: Path, title: str) -> None:
    """Validation loss (left axis) and validation CIDEr (right axis) per epoch (the rows of
    :func:`clipcap.pipeline.reports.read_curve`); a note when training logged no epoch."""
    loss, cider = series(curve, "val_loss"), series(curve, "val_CIDEr")

    def draw(ax) -> None:
        from matplotlib.ticker import MaxNLocator

        if loss:
            ax.plot(*zip(*loss), marker="o", color="tab:blue")
            ax.set_ylabel("validation loss", color="tab:blue")
        else:
            ax.text(0.5, 0.5, "no epoch logged", ha="center", va="center", transform=ax.transAxes)
        if cider:
            right = ax.twinx()
            right.plot(*zip(*cider), marker="s", color="tab:orange")
            right.set_ylabel("validation CIDEr", color="tab:orange")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # whole epochs

    _chart(path, title, draw)
