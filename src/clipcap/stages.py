"""The six pipeline stages as plain functions of the config: what ``clipcap <verb>`` runs.

fetch -> validate -> embed -> train -> evaluate -> register. Each reads the files of the
stage before it under ``paths.artifacts`` (see :class:`Layout`) and writes its own. ``fetch``
writes every input row (``raw_manifest.parquet``); ``validate`` quarantines the bad ones and
writes the clean ``manifest.parquet`` that every later stage reads.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from clipcap.config import Config, config_to_dict
from clipcap.errors import ClipcapError
from clipcap.fileio import read_json, write_atomic, write_json, write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where each stage writes, under ``paths.artifacts``."""

    root: Path

    @classmethod
    def of(cls, cfg: Config) -> Layout:
        return cls(Path(cfg.paths.artifacts))

    raw_manifest = property(lambda self: self.root / "raw_manifest.parquet")  # fetch: every input row
    manifest = property(lambda self: self.root / "manifest.parquet")  # validate: the clean manifest, read downstream
    validation_dir = property(lambda self: self.root / "validation")
    validation_report = property(lambda self: self.validation_dir / "report.json")
    validation_markdown = property(lambda self: self.validation_dir / "report.md")
    quarantine = property(lambda self: self.validation_dir / "quarantine.jsonl")
    embeddings = property(lambda self: self.root / "embeddings")
    model = property(lambda self: self.root / "model")
    checkpoints = property(lambda self: self.root / "checkpoints")
    training_dir = property(lambda self: self.root / "training")
    train_log = property(lambda self: self.training_dir / "loss.csv")
    train_summary = property(lambda self: self.training_dir / "summary.json")
    metrics = property(lambda self: self.root / "metrics.json")
    predictions = property(lambda self: self.root / "evaluation" / "predictions.jsonl")
    samples = property(lambda self: self.root / "evaluation" / "samples.md")
    registered = property(lambda self: self.root / "registered.json")


# ---------------------------------------------------------------- fetch
def fetch(cfg: Config) -> pd.DataFrame:
    """Read the configured source and the user batches (downloading what is configured) into the
    records table: one row per input row, unreadable rows included with their problem."""
    from clipcap.data.manifest import build_records, collect_records, write_records

    layout = Layout.of(cfg)
    records = build_records(collect_records(cfg.dataset), cfg.split)
    write_records(records, layout.raw_manifest)
    problems = records.loc[records["problem"] != "", "problem"].value_counts().to_dict()
    log.info("fetch: %d input rows, %d image files%s -> %s", len(records), records["path"].nunique(),
             "; unreadable rows: " + ", ".join(f"{k} {v}" for k, v in problems.items()) if problems else "",
             layout.raw_manifest)
    return records


# ---------------------------------------------------------------- validate
def validate(cfg: Config) -> None:
    """Quarantine the bad input rows (one reason each), write the clean manifest and the reports;
    fail only when the quarantined fraction exceeds ``validate.max_bad_fraction``."""
    from clipcap.data.manifest import read_records, write_manifest
    from clipcap.data.validate import DataValidationError, validate_records, write_quarantine

    layout = Layout.of(cfg)
    result = validate_records(read_records(layout.raw_manifest), cfg.validate)
    write_quarantine(result.quarantine, layout.quarantine)
    write_json(layout.validation_report, result.to_dict())
    write_text(layout.validation_markdown, result.to_markdown(layout.quarantine))
    if not result.success:
        layout.manifest.unlink(missing_ok=True)  # later stages must not run on a stale manifest
        raise DataValidationError(result.failure_message(layout.quarantine, layout.validation_markdown))
    write_manifest(result.manifest, layout.manifest)
    counts = result.manifest["split"].value_counts().to_dict()
    log.info("validate: %d clean rows in %d images (%s) -> %s; %d quarantined (%.1f%%%s) -> %s",
             result.clean_records, len(result.manifest), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             layout.manifest, result.quarantined, 100 * result.bad_fraction,
             f": {result.reasons_text()}" if result.quarantined else "", layout.quarantine)


# ---------------------------------------------------------------- embed
def embed(cfg: Config) -> None:
    from clipcap.data.manifest import read_manifest
    from clipcap.embed import embed_manifest
    from clipcap.embedding_store import EmbeddingStore
    from clipcap.encoders import build_encoder

    layout = Layout.of(cfg)
    frame = read_manifest(layout.manifest)
    encoder = build_encoder(cfg.encoder.name)
    store = EmbeddingStore(layout.embeddings, encoder.key)
    stats = embed_manifest(frame["image_id"].tolist(), frame["path"].tolist(), encoder, store,
                           batch_size=cfg.encoder.batch_size, num_workers=cfg.encoder.num_workers)
    log.info("embed: %d images, %d encoded, %d reused -> %s", stats.total, stats.encoded, stats.reused, store.dir)


def _split_data(cfg: Config, *splits: str) -> list[tuple[pd.DataFrame, torch.Tensor]]:
    """For each split: its rows of the clean manifest (written by ``validate``) and their embeddings."""
    from clipcap.data.manifest import read_manifest
    from clipcap.embedding_store import EmbeddingStore
    from clipcap.encoders import encoder_key

    layout = Layout.of(cfg)
    frame = read_manifest(layout.manifest)
    store = EmbeddingStore(layout.embeddings, encoder_key(cfg.encoder.name))
    out = []
    for split in splits:
        rows = frame[frame["split"] == split].reset_index(drop=True)
        out.append((rows, store.get(rows["image_id"].tolist())))
    return out


def _pairs(rows: pd.DataFrame, embeddings: torch.Tensor, tokenizer, max_tokens: int):
    from clipcap.captions import CaptionPairs, tokenize_captions

    image_index = [i for i, captions in enumerate(rows["captions"]) for _ in captions]
    captions = [c for captions in rows["captions"] for c in captions]
    return CaptionPairs(embeddings, image_index, tokenize_captions(tokenizer, captions, max_tokens))


# ---------------------------------------------------------------- train
def train(cfg: Config, resume: bool = False) -> None:
    """Train on the train split (validation loss on val); under ``torchrun`` every process runs
    this and rank 0 writes. ``resume`` continues from ``artifacts/checkpoints``."""
    from clipcap.captioner import save_captioner
    from clipcap.distributed import current_context
    from clipcap.lm import load_lm
    from clipcap.model import ClipCap
    from clipcap.train import train_model

    layout = Layout.of(cfg)
    (train_rows, train_emb), (val_rows, val_emb) = _split_data(cfg, "train", "val")
    if len(train_rows) == 0:
        raise ClipcapError("the train split is empty: add data or lower split.test_fraction/val_fraction")
    lm = load_lm(cfg.lm.name, cfg.lm.tokenizer, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = ClipCap(cfg.mapper, train_emb.shape[1], lm.model, finetune_lm=cfg.lm.finetune)
    model.fit_embedding_mean(train_emb)
    history = train_model(model, _pairs(train_rows, train_emb, lm.tokenizer, cfg.train.max_caption_tokens),
                          _pairs(val_rows, val_emb, lm.tokenizer, cfg.train.max_caption_tokens) if len(val_rows) else None,
                          cfg.train, pad_token_id=lm.tokenizer.pad_token_id, checkpoint_dir=layout.checkpoints,
                          resume=resume, fingerprint=_training_fingerprint(cfg, train_rows, val_rows))
    if not current_context().is_main:
        return
    save_captioner(layout.model, model.cpu(), encoder=cfg.encoder.name, lm_name=cfg.lm.name,
                   tokenizer_name=cfg.lm.tokenizer, lm_pretrained=lm.pretrained)

    def write_log(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "epoch", "loss", "lr"])
            writer.writeheader()
            writer.writerows(history.steps)

    write_atomic(layout.train_log, write_log)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    write_json(layout.train_summary, {"trainable_parameters": trainable, "parameters": model.parameter_summary(),
                                      "train_pairs": sum(len(c) for c in train_rows["captions"]), "epochs": history.epochs,
                                      "stopped_early": history.stopped_early, "final_loss": history.steps[-1]["loss"]})
    log.info("model saved to %s", layout.model)


def _training_fingerprint(cfg: Config, *splits: pd.DataFrame) -> str:
    """What a checkpoint must have been trained on to be resumed: params and data."""
    from clipcap.encoders import encoder_key

    train_cfg = {k: v for k, v in config_to_dict(cfg.train).items()
                 if k not in ("device", "checkpoint_every", "keep_checkpoints")}
    described = {"lm": config_to_dict(cfg.lm), "mapper": config_to_dict(cfg.mapper), "train": train_cfg,
                 "encoder": encoder_key(cfg.encoder.name), "images": [rows["image_id"].tolist() for rows in splits]}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- evaluate
def evaluate(cfg: Config) -> dict:
    from clipcap.captioner import load_captioner_model
    from clipcap.decode import generate_captions
    from clipcap.evaluate import most_frequent_caption, retrieval_captions, score_by_group, score_systems
    from clipcap.metrics import spice_available
    from clipcap.train import resolve_device

    layout = Layout.of(cfg)
    (test_rows, test_emb), (train_rows, train_emb) = _split_data(cfg, "test", "train")
    if len(test_rows) == 0:
        raise ClipcapError("the test split is empty: add data or raise split.test_fraction")
    model, tokenizer, _ = load_captioner_model(layout.model)
    model.to(resolve_device(cfg.train.device))
    ids = test_rows["image_id"].tolist()
    decoding = dataclasses.replace(cfg.evaluate.decoding, num_captions=1)
    log.info("captioning %d test images (%s)", len(ids), decoding)
    predicted = [c[0] for c in generate_captions(model, tokenizer, test_emb, decoding, cfg.evaluate.batch_size)]
    train_captions = train_rows["captions"].tolist()
    frequent = most_frequent_caption(train_captions)
    retrieved = retrieval_captions(train_emb, train_captions, test_emb)
    systems = {
        "model": dict(zip(ids, predicted)),
        "baseline_most_frequent": {i: frequent for i in ids},
        "baseline_retrieval": dict(zip(ids, retrieved)),
    }
    references = dict(zip(ids, test_rows["captions"]))
    scores = score_systems(references, systems)
    metrics = {
        **scores,
        "test_images": len(ids),
        "spice": "computed" if spice_available() else "unavailable (needs Stanford CoreNLP jars; offline here)",
    }
    if "domain" in test_rows and test_rows["domain"].notna().any():  # nocaps: in-, near-, out-of-domain
        domains = {i: d for i, d in zip(ids, test_rows["domain"]) if isinstance(d, str) and d}
        metrics["by_domain"] = score_by_group(references, systems, domains)
        log.info("CIDEr of the model by domain: %s", ", ".join(
            f"{d} {m['model']['CIDEr']:.3f} ({m['images']} images)" for d, m in metrics["by_domain"].items()))
    write_json(layout.metrics, metrics)
    _write_samples(layout, test_rows, predicted, retrieved, cfg.evaluate.num_samples)
    log.info("CIDEr: model %.3f | most frequent %.3f | retrieval %.3f -> %s", scores["model"]["CIDEr"],
             scores["baseline_most_frequent"]["CIDEr"], scores["baseline_retrieval"]["CIDEr"], layout.metrics)
    return metrics


def _write_samples(layout: Layout, rows: pd.DataFrame, predicted: list[str], retrieved: list[str], count: int) -> None:
    records = [
        {"image_id": i, "path": p, "references": list(r), "prediction": c, "retrieval": n}
        for i, p, r, c, n in zip(rows["image_id"], rows["path"], rows["captions"], predicted, retrieved)
    ]
    write_text(layout.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    lines = ["# Sample captions (test split)", "", "| image | reference | model | retrieval baseline |", "|---|---|---|---|"]
    for r in records[:count]:
        cells = [f"`{r['path']}`", r["references"][0], r["prediction"], r["retrieval"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    write_text(layout.samples, "\n".join(lines) + "\n")


# ---------------------------------------------------------------- register
def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


def register(cfg: Config) -> dict:
    from clipcap.registry import log_and_register

    layout = Layout.of(cfg)
    metrics = read_json(layout.metrics)
    numeric = {f"{system}_{name}": value
               for system, scores in metrics.items() if isinstance(scores, dict) and system != "by_domain"
               for name, value in scores.items() if isinstance(value, (int, float))}
    numeric.update({f"{system}_{name}_{domain}": value
                    for domain, systems in metrics.get("by_domain", {}).items()
                    for system, scores in systems.items() if isinstance(scores, dict)
                    for name, value in scores.items() if isinstance(value, (int, float))})
    with layout.train_log.open() as handle:
        steps = [{"step": int(r["step"]), "loss": float(r["loss"])} for r in csv.DictReader(handle)]
    params = {k: str(v) for k, v in _flatten("", config_to_dict(cfg), {}).items()}
    params["host.python"] = platform.python_version()
    example = pd.read_parquet(layout.manifest, columns=["path"])["path"].iloc[0]
    registration = log_and_register(
        cfg.register, cfg.dataset.name, layout.model, params, numeric, steps,
        files=[layout.metrics, layout.samples, layout.validation_markdown, layout.train_summary],
        example_image=example,
    )
    result = {
        "name": registration.name,
        "version": registration.version,
        "model_uri": registration.uri,
        "run_id": registration.run_id,
        "metric": registration.metric,
        "value": registration.value,
        "promoted_to_champion": registration.promoted,
        "previous_champion": registration.champion_before,
        "tracking_uri": cfg.register.tracking_uri,
    }
    write_json(layout.registered, result)
    return result


# ---------------------------------------------------------------- summary
def summary(cfg: Config) -> str:
    """A short human-readable account of the last run: metrics table, samples, registered model."""
    layout = Layout.of(cfg)
    lines = []
    if layout.metrics.exists():
        metrics = read_json(layout.metrics)
        systems = [name for name, value in metrics.items() if isinstance(value, dict) and name != "by_domain"]
        names = list(metrics[systems[0]])
        width = max(len(s) for s in systems)
        lines.append(f"Test split: {metrics['test_images']} images (SPICE: {metrics['spice']})")
        lines.append(" " * width + "".join(f"{n:>9}" for n in names))
        for system in systems:
            cells = "".join(f"{'n/a' if v is None else format(v, '.3f'):>9}" for v in metrics[system].values())
            lines.append(f"{system:<{width}}{cells}")
        if metrics.get("by_domain"):
            lines.append("model CIDEr by domain: " + ", ".join(
                f"{d} {m['model']['CIDEr']:.3f} ({m['images']} images)" for d, m in metrics["by_domain"].items()))
    if layout.samples.exists():
        lines += ["", f"Sample captions: {layout.samples}"]
    if layout.registered.exists():
        reg = read_json(layout.registered)
        champion = "champion" if reg["promoted_to_champion"] else f"challenger (champion stays v{reg['previous_champion']})"
        lines += ["", f"MLflow: {reg['name']} version {reg['version']} -> {champion}; "
                      f"{reg['metric']}={reg['value']:.3f}; run {reg['run_id']} in {reg['tracking_uri']}"]
    return "\n".join(lines) if lines else "No results yet: run 'dvc repro'."
