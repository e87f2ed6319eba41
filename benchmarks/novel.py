"""Leave-category-out: captions of a kind the captioner never saw, beside the retrieval and label baselines.

For each held-out top category (Tux Paint ``animals`` and ``food``, Open Clip Art ``animals``) the
captioner is trained without any image of it - neither in training nor in its datastore - and tested
on every image of it (train, val and test rows alike: none was seen). The other categories keep their
train and val splits; their test rows are left out. Per seed the model is trained from scratch; the
baselines are scored in the same runs:

- ``model``: params.yaml's captioner as it is (with its entity source, when ``entities.source`` is set);
- ``retrieval``: the nearest training image's caption by the encoder's similarity;
- ``label``: "A <the encoder's own ImageNet top-1 label>." (EfficientNet-Lite0's classifier).

Metrics: CIDEr, BLEU-4, METEOR and ``names_object`` (the share of images whose caption holds the head noun
of the reference, lemmatised: ``clipcap.naming``).

    dvc repro embed@tuxpaint embed@openclipart          # manifests and embeddings it reads
    python benchmarks/novel.py [--cases tuxpaint/animals ...] [--seeds 0 1 2] [--jobs 2] [-S entities.source=none]
    python benchmarks/novel.py --keep runs/ ...; python benchmarks/novel.py --rescore runs/   # caption again, no training

Writes ``benchmarks/results/novel-<machine>.json`` and ``.md``: "<dataset>/<category>" -> model /
retrieval / label -> metric -> ``{"seeds", "mean", "ci95"}`` (the t-interval of the mean over the seeds;
the baselines do not depend on the seed, so their interval is the bootstrap over the images).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()

import pandas as pd  # noqa: E402
import kept_runs  # noqa: E402  (benchmarks/kept_runs.py)
from model_speed import cpu_model, save_report  # noqa: E402  (benchmarks/model_speed.py)
from quality import embedded, summarise  # noqa: E402

import yaml  # noqa: E402

from clipcap.config import config_from_dict, read_params  # noqa: E402
from clipcap.pipeline.layout import Layout  # noqa: E402
from clipcap.pipeline.stages import evaluate, train  # noqa: E402

CASES = ("tuxpaint/animals", "tuxpaint/food", "openclipart/animals")
METRICS = ("CIDEr", "names_object", "BLEU-4", "METEOR")
SYSTEMS = {"model": "model", "retrieval": "baseline_retrieval", "label": "baseline_label"}


def held_out_manifest(manifest: pd.DataFrame, category: str) -> pd.DataFrame:
    """The manifest with ``category`` as the whole test split and out of train and val; the other
    categories' test rows are left out."""
    if category not in set(manifest["category"]):
        raise SystemExit(f"no category {category!r} in the manifest; it has {sorted(set(manifest['category']))}")
    held = manifest["category"] == category
    out = manifest[held | (manifest["split"] != "test")].copy()
    out.loc[out["category"] == category, "split"] = "test"
    return out.reset_index(drop=True)


def load_with_overrides(params: str, dataset: str, overrides: list[str]):
    """params.yaml's config of ``dataset`` with ``section.key=value`` overrides (values read as YAML)."""
    data = read_params(params)
    for item in overrides:
        key, _, value = item.partition("=")
        *sections, last = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = yaml.safe_load(value)
    return config_from_dict(data, dataset)


def run_one(cfg, source: Path, category: str, workdir: Path, threads: int | None = None) -> dict:
    """Train ``cfg`` without ``category`` and evaluate on it, in ``workdir``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    layout = Layout(workdir)
    workdir.mkdir(parents=True)
    held_out_manifest(pd.read_parquet(source / "manifest.parquet"), category).to_parquet(layout.manifest)
    layout.embeddings.symlink_to((source / "embeddings").resolve(), target_is_directory=True)
    cfg = dataclasses.replace(cfg, retrain=dataclasses.replace(cfg.retrain, warm_start=False))
    started = time.perf_counter()
    train.run(cfg, layout, tracking=False)
    seconds = kept_runs.save_timing(workdir, time.perf_counter() - started)
    return evaluate.run(cfg, layout) | seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="dataset/category pairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, each on cores/jobs threads")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        help="a params override for the model, e.g. -S entities.source=none (repeatable)")
    kept_runs.add_arguments(parser, "caption the kept runs' test (held-out) or validation (familiar) images")
    parser.add_argument("--name", default=None, help="result file kind: results/<name>-<machine> (default: novel)")
    parser.add_argument("--render", type=Path, default=None, help="only print (and rewrite) the .md of this JSON")
    args = kept_runs.parse_arguments(parser)
    if args.render:
        text = render(json.loads(args.render.read_text()))
        args.render.with_suffix(".md").write_text(text)
        print(text)
        return
    started = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    runs: dict[str, list[dict]] = {case: [] for case in args.cases}
    with tempfile.TemporaryDirectory(prefix="clipcap-novel-") as scratch, ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {}
        for case in args.cases:
            dataset, category = case.split("/")
            cfg = load_with_overrides(args.params, dataset, args.overrides)
            source = None if args.rescore else embedded(Layout.of(dataset).root, dataset)
            for seed in args.seeds:
                seeded = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
                if args.rescore:
                    kept = kept_runs.kept_run(args.rescore, f"{dataset}-{category}-{seed}")
                    pending[case, seed] = pool.submit(kept_runs.rescore_one, seeded, kept, threads, args.split)
                    continue
                pending[case, seed] = pool.submit(run_one, seeded, source, category,
                                                  (args.keep or Path(scratch)) / f"{dataset}-{category}-{seed}",
                                                  threads)
        for case in args.cases:
            for seed in args.seeds:
                runs[case].append(pending[case, seed].result())
                found = runs[case][-1]
                print(f"== {case}, seed {seed}: " + ", ".join(
                    f"{name} CIDEr {found[key]['CIDEr']:.3f} names {found[key]['names_object']:.2f}"
                    for name, key in SYSTEMS.items()), flush=True)
                write_report(runs, args, started)


def write_report(runs: dict[str, list[dict]], args, started: float) -> None:
    results = {}
    for case, found in runs.items():
        if not found:
            continue
        first = found[0]
        results[case] = {"model": {m: summarise([r["model"][m] for r in found]) for m in METRICS},
                         "test_images": first["test_images"]}
        if all("train_seconds" in r for r in found):
            results[case]["train_seconds"] = summarise([r["train_seconds"] for r in found])
        for name, key in SYSTEMS.items():
            if name != "model":
                results[case][name] = {m: {"seeds": [first[key][m]], "mean": first[key][m],
                                           "ci95": first["ci95"][key].get(m, [first[key][m]] * 2)} for m in METRICS}
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": cpu_model(),
              "seconds": round(time.time() - started), "seeds": args.seeds, "params": args.params,
              "overrides": args.overrides,
              **kept_runs.report_entry(args), **results}
    text = render(report)
    save_report(args.name or ("novel" if args.split == "test" else f"novel-{args.split}"), report, text)
    print(text, flush=True)


def render(report: dict) -> str:
    """The Markdown table of a report (``python benchmarks/novel.py --render results/novel-<cpu>.json``)."""
    overrides = report.get("overrides") or []
    lines = [f"# Leave-category-out captions ({report['date'][:10]}, {report['machine']})", "",
             "Each category held out of training and the datastore, tested on all its images; the model's mean "
             "[95% interval] over its seeds (t), the baselines' bootstrap over the images"
             f"{'; overrides ' + ' '.join(overrides) if overrides else ''}"
             f"{'; the kept runs captioned again with this date' + chr(39) + 's inference code (--rescore)' if report.get('rescored') else ''}.", "",
             "| held out | images | system | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for case, found in report.items():
        if "/" not in case:
            continue
        for system in SYSTEMS:
            seeds = len(found[system]["CIDEr"]["seeds"]) if system == "model" else "-"
            lines.append(f"| {case} | {found['test_images']} | {system} | {seeds} | " + " | ".join(
                f"{found[system][m]['mean']:.3f} [{found[system][m]['ci95'][0]:.3f}, {found[system][m]['ci95'][1]:.3f}]"
                for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
