"""``clipcap evaluate``: caption the test split and score the model beside the baselines, scored the same
way: the most frequent training caption, nearest-neighbour retrieval, and, where the encoder has a
classifier of its own (EfficientNet-Lite0's ImageNet head), "A <its top-1 label>." Each system also gets
``names_object``: the share of test images whose caption names their reference's head noun
(:mod:`clipcap.naming`). Beside ``metrics.json`` it draws the scores and the learning curve
(:mod:`clipcap.pipeline.charts`), which the gallery shows.

Scaled out, ``clipcap evaluate --part I/N`` only captions part I of N of the test images and keeps the
captions (:mod:`clipcap.pipeline.caption_parts`); run the N parts anywhere the project is reachable
(``flows/parts.py``), then the stage captions only what no part did, and scores everything."""

from __future__ import annotations

import hashlib
import json
import logging

from clipcap.config import Config, config_to_dict
from clipcap.environment import resolve_device
from clipcap.errors import ClipcapError
from clipcap.fileio import write_json
from clipcap.modeling.captioner import Captioner
from clipcap.modeling.labels import encoder_labels, label_caption
from clipcap.pipeline.charts import score_table, write_curve_chart, write_score_chart
from clipcap.pipeline.caption_parts import CaptionParts, captions_key
from clipcap.pipeline.baselines import most_frequent_caption, retrieval_captions, score_by_group, score_systems
from clipcap.pipeline.gallery import write_gallery
from clipcap.pipeline.layout import Layout
from clipcap.pipeline.metrics import spice_available
from clipcap.pipeline.parts import in_part, part_name
from clipcap.naming import names_object_rate
from clipcap.pipeline.reports import domain_line, read_curve, write_samples
from clipcap.pipeline.scoring import caption_test_split
from clipcap.pipeline.splits import split_data

log = logging.getLogger(__name__)


def test_set_digest(references: dict[str, list[str]]) -> str:
    """sha256 of the test images (content ids) and their reference captions."""
    canonical = json.dumps(sorted((i, list(refs)) for i, refs in references.items()), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _caption_parts(cfg: Config, layout: Layout) -> CaptionParts:
    """Where parts keep test captions for this captioner and these ``evaluate`` settings."""
    return CaptionParts(layout.caption_parts, captions_key(layout.model, config_to_dict(cfg.evaluate)))


def caption_part(cfg: Config, layout: Layout, part: tuple[int, int]) -> dict:
    """Caption part ``part`` of the test images and keep the captions for the stage; how many."""
    (test_rows, test_emb), = split_data(layout, cfg.encoder.name, "test")
    mine = [in_part(i, part) for i in test_rows["image_id"]]
    ids = test_rows["image_id"][mine].tolist()
    captioner = Captioner.load(layout.model, device=resolve_device(cfg.train.device))
    captions = caption_test_split(captioner, test_emb[mine], cfg.evaluate) if ids else []
    path = _caption_parts(cfg, layout).write(part_name(part), dict(zip(ids, captions)))
    log.info("evaluate part %d/%d: %d of %d test images captioned -> %s", part[0] + 1, part[1], len(ids),
             len(test_rows), path)
    return {"part": f"{part[0] + 1}/{part[1]}", "captioned": len(ids)}


def caption_missing(captioner: Captioner, ids: list[str], embeddings, cfg: Config, layout: Layout) -> list[str]:
    """The test captions: those parts made for this very captioner and settings, the rest made here."""
    parts = _caption_parts(cfg, layout)
    made = parts.read()
    missing = [n for n, i in enumerate(ids) if i not in made]
    if made:
        log.info("%d test captions made by parts, %d to make here", len(ids) - len(missing), len(missing))
    fresh = iter(caption_test_split(captioner, embeddings[missing], cfg.evaluate) if missing else [])
    captions = [made[i] if i in made else next(fresh) for i in ids]
    parts.consume()
    return captions


def run(cfg: Config, layout: Layout | None = None, part: tuple[int, int] | None = None) -> dict:
    layout = layout or Layout.of(cfg.dataset.name)
    if part is not None:
        return caption_part(cfg, layout, part)
    (test_rows, test_emb), (train_rows, train_emb) = split_data(layout, cfg.encoder.name, "test", "train")
    if len(test_rows) == 0:
        raise ClipcapError("the test split is empty: add data or raise split.test_fraction")
    captioner = Captioner.load(layout.model, device=resolve_device(cfg.train.device))
    ids = test_rows["image_id"].tolist()
    predicted = caption_missing(captioner, ids, test_emb, cfg, layout)
    train_captions = train_rows["captions"].tolist()
    frequent = most_frequent_caption(train_captions)
    retrieved = retrieval_captions(train_emb, train_captions, test_emb)
    systems = {
        "model": dict(zip(ids, predicted)),
        "baseline_most_frequent": {i: frequent for i in ids},
        "baseline_retrieval": dict(zip(ids, retrieved)),
    }
    labels = encoder_labels(captioner.encoder)
    labelled = None if labels is None else [label_caption(top[0].name) for top in labels.top(test_emb, k=1)]
    if labelled is not None:
        systems["baseline_label"] = dict(zip(ids, labelled))
    references = dict(zip(ids, test_rows["captions"]))
    scores = score_systems(references, systems)
    metrics = {
        **{name: found.corpus | {"names_object": names_object_rate(systems[name], references)}
           for name, found in scores.items()},
        "test_images": len(ids),
        "test_set": test_set_digest(references),   # what makes two runs' scores comparable (the promotion gate)
        "spice": "computed" if spice_available() else "unavailable (needs Stanford CoreNLP jars; offline here)",
        "ci95": {name: found.ci95 for name, found in scores.items()},   # bootstrap over the test images
        "decoding": config_to_dict(cfg.evaluate.decoding),   # what the captions were made with (re-used by the gate)
    }
    if "domain" in test_rows and test_rows["domain"].notna().any():  # nocaps: in-, near-, out-of-domain
        domains = {i: d for i, d in zip(ids, test_rows["domain"]) if isinstance(d, str) and d}
        metrics["by_domain"] = score_by_group(references, systems, domains)
        log.info(domain_line(metrics))
    write_json(layout.metrics, metrics)
    per_image = {name: found.per_image for name, found in scores.items()}
    records = write_samples(layout, test_rows, predicted, retrieved, per_image, cfg.evaluate.num_samples, labelled)
    name = f"clipcap-{cfg.dataset.name}"
    write_score_chart(score_table(metrics), layout.score_chart, f"{name}: {len(ids)} test images")
    write_curve_chart(read_curve(layout.learning_curve), layout.curve_chart, f"{name}: learning curve")
    write_gallery(layout.gallery, records, f"{name}: captions of the test split",
                  charts=[layout.score_chart, layout.curve_chart])
    log.info("CIDEr: model %.3f %s | most frequent %.3f | retrieval %.3f %s%s -> %s",
             metrics["model"]["CIDEr"], metrics["ci95"]["model"].get("CIDEr"),
             metrics["baseline_most_frequent"]["CIDEr"], metrics["baseline_retrieval"]["CIDEr"],
             metrics["ci95"]["baseline_retrieval"].get("CIDEr"),
             f" | label {metrics['baseline_label']['CIDEr']:.3f}" if "baseline_label" in metrics else "", layout.metrics)
    log.info("names the object: %s", ", ".join(f"{name} {found['names_object']:.2f}"
                                               for name, found in metrics.items() if isinstance(found, dict)
                                               and "names_object" in found))
    return metrics
