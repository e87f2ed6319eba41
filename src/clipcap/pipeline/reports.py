"""What the stages write for people and for MLflow: the loss log, the sample captions, the
metrics file read back (its one parser), and the ``clipcap summary`` text."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd

from clipcap.fileio import read_json, write_atomic, write_text
from clipcap.pipeline.layout import Layout

LOSS_FIELDS = ("step", "epoch", "loss", "lr")


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    """``rows`` as CSV with a header, written atomically; keys outside ``fields`` are left out."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


def write_loss_log(path: Path, steps: list[dict]) -> None:
    """One row per optimizer step (``dvc plots`` reads it)."""
    _write_csv(path, LOSS_FIELDS, steps)


CURVE_FIELDS = ("epoch", "step", "train_loss", "val_loss", "val_CIDEr")


def write_learning_curve(path: Path, epochs: list[dict]) -> None:
    """One row per epoch: the optimizer step it ended at, train and val loss, val CIDEr (``dvc plots``)."""
    _write_csv(path, CURVE_FIELDS, epochs)


def read_curve(path: Path) -> list[dict[str, float]]:
    """``training/curve.csv``'s rows (epoch, step, val_loss, val_CIDEr, ...) as numbers, a blank cell left
    out; empty when the file is absent."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as handle:
        return [{column: float(value) for column, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(handle)]


def series(rows: list[dict[str, float]], column: str, x: str = "epoch") -> list[tuple[float, float]]:
    """(x, column) of each row of :func:`read_curve` that has both."""
    return [(row[x], row[column]) for row in rows if x in row and column in row]


def learning_curves(layout: Layout) -> dict[str, list[tuple[int, float]]]:
    """``{"train_loss": [(step, value)...], "val_loss": [...], "val_CIDEr": [...]}`` from the training logs."""
    with layout.train_log.open() as handle:
        curves = {"train_loss": [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]}
    if layout.learning_curve.exists():
        rows = read_curve(layout.learning_curve)
        for name in ("val_loss", "val_CIDEr"):
            curves[name] = [(int(step), value) for step, value in series(rows, name, x="step")]
    return curves


def write_samples(layout: Layout, rows: pd.DataFrame, predicted: list[str], retrieved: list[str],
                  per_image: dict[str, dict[str, dict[str, float]]], count: int,
                  labelled: list[str] | None = None) -> list[dict]:
    """Every test prediction with each system's scores on that image (``predictions.jsonl``), and
    the first ``count`` as a Markdown table; ``labelled``: the label baseline's captions, where there is one."""
    records = [
        {"image_id": i, "path": p, "references": list(r), "prediction": c, "retrieval": n,
         **({} if labelled is None else {"label": labelled[k]}),
         "scores": {system: found.get(i, {}) for system, found in per_image.items()}}
        for k, (i, p, r, c, n) in enumerate(zip(rows["image_id"], rows["path"], rows["captions"], predicted, retrieved))
    ]
    write_text(layout.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    label_column = labelled is not None
    lines = ["# Sample captions (test split)", "",
             "| image | reference | model | retrieval baseline |" + (" label baseline |" if label_column else ""),
             "|---|---|---|---|" + ("---|" if label_column else "")]
    for r in records[:count]:
        cells = [f"`{r['path']}`", r["references"][0], r["prediction"], r["retrieval"],
                 *([r["label"]] if label_column else [])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    write_text(layout.samples, "\n".join(lines) + "\n")
    return records


# ---------------------------------------------------------------- metrics.json
# {"model": {"BLEU-1": ..., "CIDEr": ...}, "baseline_...": {...}, "test_images": n, "spice": "...",
#  "ci95": {system: {metric: [low, high]}}, "decoding": {the evaluate.decoding the model's captions were made with},
#  "by_domain": {domain: {"images": n, system: {metric: value}}}}  (by_domain only for nocaps)
NOT_SYSTEMS = ("by_domain", "ci95", "decoding")


def system_scores(metrics: dict) -> dict[str, dict[str, float | None]]:
    """``{system: {metric: value}}`` of a ``metrics.json`` (the whole test split)."""
    return {name: scores for name, scores in metrics.items() if isinstance(scores, dict) and name not in NOT_SYSTEMS}


def domain_scores(metrics: dict) -> dict[str, dict]:
    """``{domain: {"images": n, "systems": {system: {metric: value}}}}`` (empty unless nocaps)."""
    return {domain: {"images": found["images"], "systems": system_scores(found)}
            for domain, found in metrics.get("by_domain", {}).items()}


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Numeric metrics as MLflow keys: ``model_CIDEr``, ``baseline_retrieval_BLEU-4``,
    ``model_CIDEr_out-domain``; ``test_images`` too."""
    out = {f"{system}_{name}": value for system, scores in system_scores(metrics).items()
           for name, value in scores.items() if isinstance(value, (int, float))}
    for domain, found in domain_scores(metrics).items():
        out.update({f"{system}_{name}_{domain}": value for system, scores in found["systems"].items()
                    for name, value in scores.items() if isinstance(value, (int, float))})
    out["test_images"] = metrics["test_images"]
    return out


def domain_line(metrics: dict) -> str:
    return "model CIDEr by domain: " + ", ".join(
        f"{d} {m['systems']['model']['CIDEr']:.3f} ({m['images']} images)" for d, m in domain_scores(metrics).items())


def summary(layout: Layout) -> str:
    """A short human-readable account of the last run: metrics table, samples, registered model."""
    lines = []
    if layout.metrics.exists():
        metrics = read_json(layout.metrics)
        systems = system_scores(metrics)
        names = list(next(iter(systems.values())))
        width = max(len(s) for s in systems)
        lines.append(f"Test split: {metrics['test_images']} images (SPICE: {metrics['spice']})")
        widths = [max(9, len(n) + 1) for n in names]
        lines.append(" " * width + "".join(f"{n:>{w}}" for n, w in zip(names, widths)))
        for system, scores in systems.items():
            cells = "".join(f"{'n/a' if scores.get(n) is None else format(scores[n], '.3f'):>{w}}"
                            for n, w in zip(names, widths))
            lines.append(f"{system:<{width}}{cells}")
        intervals = metrics.get("ci95", {})
        if any(intervals.values()):
            lines.append("CIDEr 95% interval (bootstrap over the test images): " + ", ".join(
                f"{system} [{found['CIDEr'][0]:.3f}, {found['CIDEr'][1]:.3f}]"
                for system, found in intervals.items() if "CIDEr" in found))
        if domain_scores(metrics):
            lines.append(domain_line(metrics))
    if layout.samples.exists():
        lines += ["", f"Sample captions: {layout.samples}"]
    if layout.gallery.exists():
        lines += [f"Gallery (every test image, worst first): {layout.gallery}"]
    if layout.registered.exists():
        reg = read_json(layout.registered)
        champion = "champion" if reg["promoted_to_champion"] else f"challenger (champion stays v{reg['previous_champion']})"
        lines += ["", f"MLflow: {reg['name']} version {reg['version']} -> {champion}; "
                      f"{reg['metric']}={reg['value']:.3f}; run {reg['run_id']} in {reg['tracking_uri']}"]
    return "\n".join(lines) if lines else "No results yet: run 'dvc repro'."


def retrain_report(registered: dict, metrics: dict, gallery: str) -> str:
    """A retraining run in Markdown (the flow publishes it as a Prefect artifact): the new version's test
    metrics beside the baselines', its register metric against the champion's, the gate's decision, and
    where the caption gallery is."""
    metric = registered["metric"]
    systems = [("this run", "model"), ("retrieval baseline", "baseline_retrieval"),
               ("label baseline", "baseline_label"), ("most frequent caption", "baseline_most_frequent")]
    systems = [(label, key) for label, key in systems if key in metrics]
    names = [name for name in metrics["model"] if metrics["model"][name] is not None]
    lines = [f"# {registered['name']} version {registered['version']}", "",
             f"Test split: {metrics.get('test_images', '?')} images.", "",
             "| system | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in systems:
        row = metrics.get(key) or {}
        lines.append(f"| {label} | " + " | ".join(_number(row.get(name)) for name in names) + " |")
    champion, before = registered.get("champion_value"), registered.get("previous_champion")
    decision = "promoted to champion" if registered["promoted_to_champion"] else "not promoted"
    lines += ["", f"| {metric} | value |", "|---|---|", f"| this run (version {registered['version']}) | "
              f"{_number(registered['value'])} |",
              f"| champion before (version {before if before is not None else '-'}) | {_number(champion)} |", "",
              f"**Gate: {decision}.** {registered['gate']}", "",
              f"Model: `{registered['model_uri']}` (MLflow run `{registered['run_id']}`). Caption gallery: {gallery}"]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def gallery_link(registered: dict, local: Path) -> str:
    """A Markdown link to the run's caption gallery: in the tracking server's UI when there is one, else
    the file (and its MLflow artifact path)."""
    uri, run = registered.get("tracking_uri") or "", registered["run_id"]
    if uri.startswith(("http://", "https://")) and registered.get("experiment_id"):
        return (f"[gallery.html]({uri.rstrip('/')}/#/experiments/{registered['experiment_id']}/runs/{run}"
                "/artifacts/gallery.html)")
    return f"[{local.name}]({local.resolve().as_uri()}) (MLflow: `runs:/{run}/gallery.html`)"
