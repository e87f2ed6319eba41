"""What keeping a captioner fresh costs: a run with nothing new, a warm-started retrain after +10 % data,
and a full retrain from scratch on the same data, each measured through `dvc repro` in a real project
(this repo's pipeline and params.yaml) on this machine, in one run.

    python benchmarks/retrain.py [--holdout 0.1] [--big 10000] [--seed 0]

Tux Paint (the embedded default) with every 10th stamp held back trains first; then
- skip: `dvc repro register@tuxpaint` with nothing new (fetch looks, nothing else runs);
- incremental: `clipcap add-batch` the held-back stamps, `dvc repro register@tuxpaint`: only they are
  embedded, training warm-starts from the champion (`retrain.epochs` over the new training images and
  `retrain.replay` times as many old ones), and the gate re-scores the champion on the grown test split;
- full: a second project holding all the data from the start: everything hashed, embedded and trained from
  scratch (`train.epochs`);
- skip_10k_images: a folder dataset of 10,000 generated images (tiny LM) built once, then a run with
  nothing new.
Both retrains are scored on the same test split; the paired bootstrap of their per-image CIDEr
differences says whether the warm start is within the noise of the full retrain. Each stage's time
comes from its last output's mtime. Writes benchmarks/results/retrain-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from model_speed import cpu_model, save_report  # noqa: E402  (benchmarks/model_speed.py)
from PIL import Image, ImageDraw  # noqa: E402
from projects import STAMPS, TINY_PARAMS, new_project  # noqa: E402  (tests/projects.py)

COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 210), "yellow": (230, 200, 40),
          "black": (10, 10, 10), "purple": (130, 40, 160), "orange": (240, 130, 20), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "bar")


def repro(project: Path, target: str) -> tuple[float, list[str]]:
    """Seconds ``dvc repro target`` took, and the stages it ran."""
    started = time.perf_counter()
    done = subprocess.run(["dvc", "repro", target], cwd=project, capture_output=True, text=True)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"dvc repro {target} failed in {project}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    ran = [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")]
    return took, ran


def read(project: Path, dataset: str, name: str) -> dict:
    return json.loads((project / "artifacts" / dataset / name).read_text())


STAGE_OUTPUTS = {"fetch": "raw_manifest.parquet", "validate": "manifest.parquet", "embed": "embed.json",
                 "train": "training/summary.json", "evaluate": "metrics.json", "register": "registered.json"}


def stage_seconds(project: Path, dataset: str, started: float) -> dict[str, float]:
    """Seconds each stage of the last `dvc repro` took: from the previous stage's last output (or the
    start, a wall-clock time) to its own (mtimes; stages that did not run are left out)."""
    out, before = {}, started
    for stage, name in STAGE_OUTPUTS.items():
        written = (project / "artifacts" / dataset / name).stat().st_mtime
        if written >= started:
            out[stage] = round(written - before, 1)
            before = written
    return out


def per_image_cider(project: Path, dataset: str) -> dict[str, float]:
    lines = (project / "artifacts" / dataset / "evaluation" / "predictions.jsonl").read_text().splitlines()
    return {row["image_id"]: row["scores"]["model"]["CIDEr"] for row in map(json.loads, filter(None, lines))}


def paired_difference(a: dict[str, float], b: dict[str, float], rounds: int = 10_000, seed: int = 0) -> dict:
    """Mean per-image difference a - b over the images both scored, with its 95 % bootstrap interval
    (images resampled with replacement, both systems together): 0 inside it = within the noise."""
    import numpy as np

    ids = sorted(a.keys() & b.keys())
    difference = np.array([a[i] - b[i] for i in ids])
    means = difference[np.random.default_rng(seed).integers(0, len(ids), (rounds, len(ids)))].mean(axis=1)
    return {"images": len(ids), "mean": round(float(difference.mean()), 4),
            "ci95": [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]}


def stamps_split(holdout: float) -> tuple[list[Path], list[Path]]:
    """Tux Paint's described stamps, and every (1/holdout)-th of them (sorted by path) held back."""
    stamps = sorted(p for p in STAMPS.rglob("*.png") if p.with_suffix(".txt").exists())
    step = round(1 / holdout)
    return [p for i, p in enumerate(stamps) if i % step != step - 1], [p for i, p in enumerate(stamps) if i % step == step - 1]


def link_stamps(stamps: list[Path], root: Path) -> None:
    """A Tux Paint stamps folder holding only ``stamps`` (links to the package's files)."""
    for png in stamps:
        for source in (png, png.with_suffix(".txt")):
            target = root / source.relative_to(STAMPS)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)


def batch_folder(stamps: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for png in stamps:
        name = "_".join(png.relative_to(STAMPS).parts)
        (folder / name).write_bytes(png.read_bytes())
        rows.append(json.dumps({"image": name, "caption": png.with_suffix(".txt").read_text().splitlines()[0]}))
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def generated_images(folder: Path, count: int, seed: int) -> None:
    """``count`` distinct small images of coloured shapes with matching captions."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    rows = []
    for n in range(count):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        image = Image.new("RGB", (48, 48), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        x, y, size = rng.randint(0, 20), rng.randint(0, 20), rng.randint(12, 26)
        box = (x, y, x + size, y + size)
        {"circle": draw.ellipse, "square": draw.rectangle, "bar": lambda b, fill: draw.rectangle(
            (b[0], b[1], b[2], b[1] + 5), fill=fill),
         "triangle": lambda b, fill: draw.polygon([(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill),
         }[shape](box, fill=COLORS[color])
        image.putpixel((n % 48, (n // 48) % 48), (n % 251, n % 241, n % 239))  # every image distinct
        image.save(folder / f"{n:05d}.png")
        rows.append(json.dumps({"image": f"{n:05d}.png", "caption": f"A {color} {shape}."}))
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--holdout", type=float, default=0.1, help="share of the stamps added as a batch")
    parser.add_argument("--big", type=int, default=10_000, help="images in the skip-run-at-scale dataset")
    parser.add_argument("--workdir", default=None, help="where the projects go (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipcap-retrain-bench-"))
    kept, held = stamps_split(args.holdout)
    print(f"{len(kept)} stamps to start with, {len(held)} held back as a batch; projects in {work}", flush=True)
    env_datasets = {"tuxpaint": {"dataset": {"root": str(work / "stamps")}}}
    link_stamps(kept, work / "stamps")
    batch = batch_folder(held, work / "held-back")
    result: dict = {"machine": cpu_model(), "cpus": os.cpu_count(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "images_start": len(kept), "images_added": len(held)}

    incremental = new_project(work / "incremental", env_datasets, shared={})
    result["initial_s"], _ = repro(incremental, "register@tuxpaint")
    print(f"initial build: {result['initial_s']:.0f} s", flush=True)
    result["skip_s"], ran = repro(incremental, "register@tuxpaint")
    result["skip_stages_run"] = ran
    print(f"skip: {result['skip_s']:.1f} s, ran {ran}", flush=True)
    subprocess.run([str(incremental / "scripts" / "bin" / "clipcap"), "add-batch", "tuxpaint", str(batch),
                    "--no-event"], cwd=incremental, check=True, capture_output=True)
    started = time.time()
    result["incremental_s"], result["incremental_stages_run"] = repro(incremental, "register@tuxpaint")
    result["incremental_stage_s"] = stage_seconds(incremental, "tuxpaint", started)
    result["incremental_images_embedded"] = read(incremental, "tuxpaint", "embed.json")["encoded"]
    result["incremental_warm_start"] = read(incremental, "tuxpaint", "training/summary.json")["warm_start"]
    metrics = read(incremental, "tuxpaint", "metrics.json")
    result["incremental_cider"], result["incremental_cider_ci95"] = metrics["model"]["CIDEr"], metrics["ci95"]["model"]["CIDEr"]
    result["incremental_retrieval_cider"] = metrics["baseline_retrieval"]["CIDEr"]
    registered = read(incremental, "tuxpaint", "registered.json")
    result["incremental_gate"], result["champion_rescored_cider"] = registered["gate"], registered["champion_value"]
    result["test_images"] = metrics["test_images"]
    print(f"incremental: {result['incremental_s']:.0f} s, CIDEr {result['incremental_cider']:.3f}", flush=True)

    link_stamps(kept + held, work / "all-stamps")  # the full project reads all of them from its source folder
    full_project = new_project(work / "full", {"tuxpaint": {"dataset": {"root": str(work / "all-stamps")}}}, shared={})
    started = time.time()
    result["full_s"], _ = repro(full_project, "register@tuxpaint")
    result["full_stage_s"] = stage_seconds(full_project, "tuxpaint", started)
    result["full_images_embedded"] = read(full_project, "tuxpaint", "embed.json")["encoded"]
    metrics = read(full_project, "tuxpaint", "metrics.json")
    result["full_cider"], result["full_cider_ci95"] = metrics["model"]["CIDEr"], metrics["ci95"]["model"]["CIDEr"]
    result["full_test_images"] = metrics["test_images"]
    if metrics["test_set"] != read(incremental, "tuxpaint", "metrics.json")["test_set"]:
        raise SystemExit("the two projects' test splits differ: their scores cannot be compared")
    result["incremental_minus_full_cider"] = paired_difference(per_image_cider(incremental, "tuxpaint"),
                                                               per_image_cider(full_project, "tuxpaint"))
    print(f"full: {result['full_s']:.0f} s, CIDEr {result['full_cider']:.3f}", flush=True)

    generated_images(work / "big-images", args.big, seed=0)
    big = new_project(work / "big", {"big": {"dataset": {"source": "folder", "root": str(work / "big-images")},
                                             "split": {"test_fraction": 0.02, "val_fraction": 0.01},
                                             "train": {"epochs": 1}}}, shared=TINY_PARAMS | {"dataset": {"limit": None}})
    result["big_build_s"], _ = repro(big, "register@big")
    result["skip_10k_images_s"], ran = repro(big, "register@big")
    result["skip_10k_images_stages_run"], result["skip_10k_images"] = ran, args.big
    print(f"skip with {args.big} images: {result['skip_10k_images_s']:.1f} s", flush=True)

    result["incremental_over_full_time"] = result["incremental_s"] / result["full_s"]
    save_report("retrain", result, markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    return "\n".join([
        f"# Retraining cost on {r['machine']} ({r['cpus']} CPUs), {r['date']}", "",
        f"Tux Paint, {r['images_start']} stamps, then +{r['images_added']} (every 10th held back); embedded "
        f"default params. Test CIDEr with its 95 % bootstrap interval over {r['test_images']} test images.", "",
        "| run | wall time | images embedded | test CIDEr |", "|---|---|---|---|",
        f"| initial build ({r['images_start']} images) | {r['initial_s']:.0f} s | {r['images_start']} | |",
        f"| nothing new | {r['skip_s']:.1f} s | 0 | (ran: {', '.join(r['skip_stages_run'])}) |",
        f"| incremental, warm start (+{r['images_added']}) | {r['incremental_s']:.0f} s | "
        f"{r['incremental_images_embedded']} | {r['incremental_cider']:.3f} {_ci(r['incremental_cider_ci95'])} |",
        f"| full retrain from scratch, same data | {r['full_s']:.0f} s | {r['full_images_embedded']} | "
        f"{r['full_cider']:.3f} {_ci(r['full_cider_ci95'])} |",
        f"| nothing new, {r['skip_10k_images']:,} images | {r['skip_10k_images_s']:.1f} s | 0 | |", "",
        f"Incremental / full time: {r['incremental_over_full_time']:.2f}. Warm start: {r['incremental_warm_start']}. "
        f"Retrieval baseline on the grown test split: CIDEr {r['incremental_retrieval_cider']:.3f}.", "",
        f"Warm start minus full retrain, per test image (paired bootstrap): CIDEr "
        f"{r['incremental_minus_full_cider']['mean']:+.3f} {_ci(r['incremental_minus_full_cider']['ci95'])}. "
        f"The champion before the batch, re-scored on the grown split by the gate: {r['champion_rescored_cider']:.3f}; "
        f"gate: {r['incremental_gate']}", "",
        "Where the time goes (seconds; each stage ends at its last output's mtime):", "",
        "| stage | incremental | full |", "|---|---|---|",
        *(f"| {stage} | {r['incremental_stage_s'].get(stage, '-')} | {r['full_stage_s'].get(stage, '-')} |"
          for stage in STAGE_OUTPUTS), ""])


def _ci(pair) -> str:
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]" if pair else ""


if __name__ == "__main__":
    main()
