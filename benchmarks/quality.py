"""Caption quality of each configuration over several seeds, beside the baselines, in one run.

For every seed, the embedded default (params.yaml as it is: ``model``) and the paper's
configuration (the same with ``retrieval.k: 0`` and ``entities.source: none``: ``model_k0``) are trained and evaluated on the
same clean manifest and stored embeddings; the baselines (``retrieval``: the nearest training
image's caption by the encoder's similarity; ``most_frequent``) are deterministic and scored in the
same runs. ``retrieval_learned`` is the default model's own search without its LM: the nearest
training image's caption in the retrieval space it learned (``retrieval.metric``), per seed.

    dvc repro embed                                  # the clean manifest and embeddings it reads
    python benchmarks/quality.py [--dataset tuxpaint] [--seeds 0 1 2] [--artifacts artifacts/<dataset>] [--jobs 2]
    python benchmarks/quality.py --keep runs/ ...; python benchmarks/quality.py --rescore runs/   # caption again, no training
    python benchmarks/quality.py --rescore runs/ --split val        # the validation images: choose settings there

Writes ``benchmarks/results/quality-<machine>.json`` and ``.md``: dataset -> system -> metric ->
``{"seeds": [...], "mean": ..., "ci95": [low, high]}``. For the models ``ci95`` is the t-interval of
the mean over the seeds (how much the result moves with the seed); for the deterministic
baselines it is the bootstrap interval over the test images (how much it moves with the sample).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()

import kept_runs  # noqa: E402  (benchmarks/kept_runs.py)
from model_speed import cpu_model, slug, write_result  # noqa: E402  (benchmarks/model_speed.py)

import torch  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

from clipcap.config import load_config  # noqa: E402
from clipcap.pipeline.layout import Layout  # noqa: E402
from clipcap.modeling.captioner import Captioner  # noqa: E402
from clipcap.pipeline.metrics import score_captions  # noqa: E402
from clipcap.pipeline.splits import split_data  # noqa: E402
from clipcap.pipeline.stages import evaluate, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t, 97.5th percentile, by degrees of freedom
SYSTEMS = {"model": "model", "baseline_retrieval": "retrieval", "baseline_most_frequent": "most_frequent"}


def embedded(source: Path, dataset: str) -> Path:
    """``source`` when it holds the clean manifest and stored embeddings the benchmarks train on, else an
    error that says how to make them (before any run starts)."""
    missing = [name for name in ("manifest.parquet", "embeddings") if not (source / name).exists()]
    if missing:
        raise SystemExit(f"{source} has no {' or '.join(missing)}: the benchmarks train on a dataset's clean "
                         f"manifest and stored embeddings; make them first: `dvc repro embed@{dataset}`")
    return source


def run_one(cfg, source: Path, workdir: Path, threads: int | None = None) -> dict:
    """Train and evaluate ``cfg`` in ``workdir`` on the manifest and embeddings under ``source``
    (on ``threads`` CPU threads when given: several runs side by side each take a share)."""
    if threads:
        torch.set_num_threads(threads)
    layout = Layout(workdir)
    workdir.mkdir(parents=True)
    shutil.copy(source / "manifest.parquet", layout.manifest)
    (layout.embeddings).symlink_to((source / "embeddings").resolve(), target_is_directory=True)
    cfg = dataclasses.replace(cfg, retrain=dataclasses.replace(cfg.retrain, warm_start=False))  # each seed from scratch
    started = time.perf_counter()
    train.run(cfg, layout, tracking=False)  # a benchmark, not a run to track
    seconds = kept_runs.save_timing(workdir, time.perf_counter() - started)
    return evaluate.run(cfg, layout) | seconds | {"retrieval_learned": learned_retrieval(cfg, layout)}


def rescore_run(cfg, workdir: Path, threads: int | None = None, split: str = "test") -> dict:
    """A kept run's ``split`` images captioned again with the current code and settings (no training)."""
    return kept_runs.rescore_one(cfg, workdir, threads, split) | {
        "retrieval_learned": learned_retrieval(cfg, Layout(kept_runs.view_folder(workdir, split)))}


def learned_retrieval(cfg, layout: Layout) -> dict | None:
    """The model's own search without its LM: the caption of the nearest training image in the trained
    captioner's retrieval space (learned from the captions, or the encoder's), scored like the model."""
    captioner = Captioner.load(layout.model)
    if captioner.retriever is None:
        return None
    (rows, embeddings), = split_data(layout, cfg.encoder.name, "test")
    found = [c[0] for c in captioner.retriever.datastore.nearest(embeddings, 1)]
    return score_captions(dict(zip(rows["image_id"], rows["captions"])), dict(zip(rows["image_id"], found)),
                          bootstrap=0).corpus


def summarise(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"seeds": values, "mean": mean, "ci95": [mean, mean]}
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return {"seeds": [round(v, 4) for v in values], "mean": round(mean, 4),
            "ci95": [round(mean - half, 4), round(mean + half, 4)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", default=None, help="one of params.yaml's datasets (default: the first)")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="holds manifest.parquet, embeddings/ (default: artifacts/<dataset>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=None, help="default: benchmarks/results/quality-<machine>")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs side by side, each on cores/jobs threads (2 on 2 cores: ~1.3x the throughput of one)")
    parser.add_argument("--k0-epochs", type=int, default=None,
                        help="epochs of the paper configuration (default: the default's); its steps cost about "
                             "half as much (no retrieval prompt), so twice the epochs take the same training time")
    parser.add_argument("--configs", nargs="+", choices=("model", "model_k0"), default=["model", "model_k0"],
                        help="which to train: model (params.yaml as it is), model_k0 (the paper configuration)")
    kept_runs.add_arguments(parser, "caption the kept runs' test or validation images (val: choose inference "
                                    "settings there, the test split unseen; results quality-val-<machine>)")
    args = kept_runs.parse_arguments(parser)
    base = load_config(args.params, args.dataset)
    args.artifacts = args.artifacts or Layout.of(base.dataset.name).root
    if not args.rescore:
        embedded(args.artifacts, base.dataset.name)
    k0 = dataclasses.replace(base, retrieval=dataclasses.replace(base.retrieval, k=0),
                             entities=dataclasses.replace(base.entities, source="none"),
                             train=dataclasses.replace(base.train, epochs=args.k0_epochs or base.train.epochs))
    configs = {name: cfg for name, cfg in {"model": base, "model_k0": k0}.items() if name in args.configs}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    started = time.time()
    machine = f"cpu-{slug(cpu_model())}"
    out = args.output or RESULTS / f"quality-{'' if args.split == 'test' else args.split + '-'}{machine}"
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with tempfile.TemporaryDirectory(prefix="clipcap-quality-") as scratch, ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {}
        for seed in args.seeds:
            for name, cfg in configs.items():
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
                if args.rescore:
                    kept = kept_runs.kept_run(args.rescore, f"{name}-{seed}")
                    pending[name, seed] = pool.submit(rescore_run, cfg, kept, threads, args.split)
                    continue
                pending[name, seed] = pool.submit(run_one, cfg, args.artifacts,
                                                  (args.keep or Path(scratch)) / f"{name}-{seed}", threads)
        for seed in args.seeds:
            for name in configs:
                runs[name].append(pending[name, seed].result())
                print(f"== {name}, seed {seed}: CIDEr {runs[name][-1]['model']['CIDEr']:.3f}", flush=True)
            # written after every seed: an interrupted run still leaves the seeds it finished
            write_report(out, runs, configs, base, args, started)


def write_report(out: Path, runs: dict[str, list[dict]], configs: dict, base, args, started: float) -> None:
    lead = runs[next(iter(runs))]
    first, seeds = lead[0], args.seeds[: len(lead)]
    results = {name: {m: summarise([r["model"][m] for r in found]) for m in METRICS} for name, found in runs.items()}
    for name, found in runs.items():  # the time budget each configuration took (train stage, wall clock)
        results[name]["train_seconds"] = summarise([r["train_seconds"] for r in found])
    if "model" in runs and all(r.get("retrieval_learned") for r in runs["model"]):   # the model's search alone, per seed
        results["retrieval_learned"] = {m: summarise([r["retrieval_learned"][m] for r in runs["model"]])
                                        for m in METRICS}
    for key, system in SYSTEMS.items():
        if key != "model":
            results[system] = {m: {"seeds": [first[key][m]], "mean": first[key][m], "ci95": first["ci95"][key][m]}
                               for m in METRICS}
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": cpu_model(),
              "seconds": round(time.time() - started), "test_images": first["test_images"], "seeds": seeds,
              "params": args.params, "epochs": {name: cfg.train.epochs for name, cfg in configs.items()},
              **kept_runs.report_entry(args), base.dataset.name: results}
    split = "Test" if args.split == "test" else "Validation"
    lines = [f"# Caption quality on {base.dataset.name} ({report['date'][:10]}, {cpu_model()})", "",
             f"{split} split: {first['test_images']} images; seeds {seeds}; mean and 95% interval "
             "(models: over the seeds; baselines: bootstrap over the images).", "",
             "| system | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for system, found in results.items():
        lines.append(f"| {system} | " + " | ".join(
            f"{found[m]['mean']:.3f} [{found[m]['ci95'][0]:.3f}, {found[m]['ci95'][1]:.3f}]" for m in METRICS) + " |")
    lines += ["", "CIDEr per seed: " + "; ".join(
        f"{name} {', '.join(f'{v:.3f}' for v in results[name]['CIDEr']['seeds'])}"
        for name in [*configs, *(["retrieval_learned"] if "retrieval_learned" in results else [])])]
    lines += ["", "Training time per run (s, mean over seeds): " + "; ".join(
        f"{name} {results[name]['train_seconds']['mean']:.0f} ({configs[name].train.epochs} epochs)"
        for name in configs)]
    write_result(out, report, "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
