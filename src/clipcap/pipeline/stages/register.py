"""``clipcap register``: log the run to MLflow, register the captioner as a new version of
``clipcap-<dataset>`` and move ``champion`` to it only when its test metric beats the champion's on the
same test set (a champion scored on another is re-scored on this run's test split first). Under
``dvc exp run`` the version is registered as that experiment's and no alias moves."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import pandas as pd

from clipcap.config import Config, config_to_dict
from clipcap.environment import resolve_device
from clipcap.errors import ClipcapError
from clipcap.fileio import read_json, write_json
from clipcap.modeling.captioner import Captioner
from clipcap.pipeline.layout import Layout
from clipcap.pipeline.lineage import lineage_tags, lock_entries
from clipcap.pipeline.metrics import corpus_metric
from clipcap.pipeline.registry import download_captioner, log_and_register, version_files
from clipcap.pipeline.scoring import caption_test_split
from clipcap.pipeline.splits import split_data
from clipcap.pipeline.reports import flat_metrics, learning_curves
from clipcap.pipeline.tracking import reusable_run, run_params

log = logging.getLogger(__name__)


def champion_rescorer(cfg: Config, layout: Layout) -> Callable[[str], float]:
    """``rescore(model_uri)``: a registered version's metric on this run's test split, captioned and
    scored as the evaluate stage scores the new model. Only images the version has not captioned yet
    are captioned: the captions its own evaluation gave the others (its run's ``predictions.jsonl``,
    made with this ``evaluate.decoding``) are re-used, so a test split grown by a batch costs the batch."""

    def rescore(uri: str) -> float:
        (rows, embeddings), = split_data(layout, cfg.encoder.name, "test")
        ids = rows["image_id"].tolist()
        known = earlier_captions(uri, cfg)
        todo = [row for row, image in enumerate(ids) if image not in known]
        log.info("re-scoring %s on %d test images: %d captions from its own evaluation, %d to make",
                 uri, len(ids), len(ids) - len(todo), len(todo))
        if todo:
            captioner = Captioner.load(download_captioner(uri, cfg.register.tracking_uri),
                                       device=resolve_device(cfg.train.device))
            if captioner.config.get("encoder") != cfg.encoder.name:
                raise ClipcapError(f"{uri} reads {captioner.config.get('encoder')} embeddings; this test set was "
                                   f"embedded with {cfg.encoder.name}")
            made = caption_test_split(captioner, embeddings[todo], cfg.evaluate)
            known = known | {ids[row]: caption for row, caption in zip(todo, made)}
        predictions = {image: known[image] for image in ids}
        references = dict(zip(ids, rows["captions"]))
        return corpus_metric(references, predictions, cfg.register.metric)

    return rescore


def earlier_captions(uri: str, cfg: Config) -> dict[str, str]:
    """{image id: caption} from a registered version's own evaluation, when it used this ``evaluate.decoding``
    (else, or for a version logged without them, none)."""
    found = version_files(uri, cfg.register.tracking_uri, "metrics.json", "predictions.jsonl")
    if found is None:
        return {}
    metrics, predictions = found
    if read_json(metrics).get("decoding") != config_to_dict(cfg.evaluate.decoding):
        log.info("%s was evaluated with other decoding settings: its test captions are made anew", uri)
        return {}
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    return {row["image_id"]: row["prediction"] for row in rows}


def warm_start_tags(summary: dict) -> dict[str, str]:
    """Where training started (``training/summary.json``'s ``warm_start``): ``clipcap.warm_start`` = the
    champion's URI, or "scratch: <reason>"."""
    start = summary.get("warm_start")
    if not start:
        return {}
    return {"clipcap.warm_start": start["from"] or f"scratch: {start['reason']}"}


def dvc_experiment() -> str | None:
    """The DVC experiment this stage runs in, or None: ``dvc exp run`` sets DVC_EXP_BASELINE_REV (and
    DVC_EXP_NAME) for the commands it runs."""
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    name = os.environ.get("DVC_EXP_NAME")
    if not (baseline or name):
        return None
    return name or f"on {baseline[:7]}"


def run(cfg: Config, layout: Layout | None = None) -> dict:
    layout = layout or Layout.of(cfg.dataset.name)
    training_summary = read_json(layout.train_summary)
    manifest = pd.read_parquet(layout.manifest)
    example = manifest["path"].iloc[0]
    metrics = read_json(layout.metrics)
    registration = log_and_register(
        cfg.register, cfg.dataset.name, layout.model, run_params(cfg), flat_metrics(metrics),
        learning_curves(layout),
        files=[layout.metrics, layout.samples, layout.predictions, layout.validation_markdown, layout.train_summary,
               layout.learning_curve, layout.gallery, layout.score_chart, layout.curve_chart],
        example_image=example,
        test_set=metrics.get("test_set"),
        serve=config_to_dict(cfg.serve),
        rescore=champion_rescorer(cfg, layout),
        experiment=dvc_experiment(),
        tags=lineage_tags(cfg.dataset.name, manifest) | warm_start_tags(training_summary),
        data=manifest[["image_id", "split", "category", "source"]],
        lock={"schema": "2.0", "stages": lock_entries(cfg.dataset.name)},
        run_id=reusable_run(training_summary.get("mlflow_run"), cfg.register.tracking_uri),
    )
    result = {
        "name": registration.name,
        "version": registration.version,
        "model_uri": registration.uri,
        "run_id": registration.run_id,
        "metric": registration.metric,
        "value": registration.value,
        "promoted_to_champion": registration.promoted,
        "gate": registration.reason,
        "previous_champion": registration.champion_before,
        "champion_value": registration.champion_value,
        "experiment_id": registration.experiment_id,
        "experiment": dvc_experiment(),
        "tracking_uri": cfg.register.tracking_uri,
    }
    write_json(layout.registered, result)
    return result
