"""``clipcap <verb>``: the one command line for the pipeline stages and for inference.

Stages (what ``dvc.yaml`` runs): fetch, validate, embed, train [--resume], evaluate, register; each
is ``clipcap.pipeline.stages.<name>.run``, imported only when its verb runs (so a stage's code is
its module's imports plus this file's module-level ones: ``dvc.yaml`` lists exactly those).
Inference: ``clipcap caption IMAGE_OR_FOLDER... --model PATH_OR_MODELS_URI``; ``clipcap serve`` (HTTP);
``clipcap interpret IMAGE --model ...`` shows the prefix as its nearest vocabulary tokens.
Multi-GPU training: ``torchrun --nproc_per_node N -m clipcap.cli train``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import logging
import sys
import typing
from pathlib import Path

from clipcap.config import DecodingConfig, config_from_mapping, dataset_names, load_config, read_params
from clipcap.environment import apply_offline_env
from clipcap.errors import ClipcapError
from clipcap.pipeline import STAGES
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _yes_no(text: str) -> bool:
    if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "yes", "1")


def _add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """One option per DecodingConfig field (``--num-beams``...), defaults from the dataclass."""
    group = parser.add_argument_group("decoding")
    hints = typing.get_type_hints(DecodingConfig)
    for field in dataclasses.fields(DecodingConfig):
        hint = hints[field.name]
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        kind = _yes_no if hint is bool else str if choices else hint
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=field.default,
                           type=kind, choices=choices, help=f"(default: {field.default})")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="captioner folder or MLflow URI such as models:/clipcap-tuxpaint@champion "
                             "(default: artifacts/<dataset>/model)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from params.yaml)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1... (default: cpu)")


def _version() -> str:
    import clipcap

    return f"clipcap {clipcap.__version__} ({Path(clipcap.__file__).resolve().parent})"


PART_HELP = {  # the stages whose per-image work runs in parts (clipcap.pipeline.parts)
    "embed": "encode only part I of N of the missing images (run the N parts in parallel, then plain "
             "'clipcap embed' merges them)",
    "evaluate": "caption only part I of N of the test images (run the N parts in parallel, then plain "
                "'clipcap evaluate' scores them all)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version(),
                        help="the version and the folder whose code runs (each clone runs its own src/)")
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("--dataset", default=None,
                        help="which of params.yaml's datasets (default: the first listed); its artifacts are "
                             "artifacts/<dataset>/")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for stage in STAGES:
        stage_parser = verbs.add_parser(stage, help=f"run the {stage} stage")
        if stage == "train":
            stage_parser.add_argument("--resume", action="store_true",
                                      help="continue from the newest checkpoint of an interrupted run")
        if stage in PART_HELP:
            stage_parser.add_argument("--part", default=None, metavar="I/N", help=PART_HELP[stage])
    verbs.add_parser("summary", help="print the metrics, samples and registered model of the last run")
    verbs.add_parser("datasets", help="list the datasets params.yaml defines, one name per line")
    caption = verbs.add_parser("caption", help="caption images (files or folders) with a trained model")
    caption.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    _add_model_options(caption)
    caption.add_argument("--batch-size", type=int, default=16)
    caption.add_argument("--workers", type=int, default=2, help="processes decoding images (default: 2)")
    caption.add_argument("--format", choices=("tsv", "jsonl"), default="tsv",
                         help="tsv: 'path<TAB>caption' per caption (a field holding a tab, newline or quote is "
                              "double-quoted, as Python's csv and pandas read it); jsonl: one object per image")
    caption.add_argument("--seed", type=int, default=0, help="random seed (strategy 'sample')")
    _add_decoding_options(caption)
    datastore = verbs.add_parser("datastore", help="extend a retrieval-augmented captioner's caption datastore")
    datastore.add_argument("action", choices=("add",), help="add: append a folder of captioned images")
    datastore.add_argument("folder", help="images + captions.jsonl or captions.csv (like a data/ batch)")
    datastore.add_argument("--model", default=None, help="the captioner folder (default: artifacts/<dataset>/model)")
    models = verbs.add_parser("models", help="the registry by hand: list the versions of clipcap-DATASET, promote "
                                             "one to champion, roll the champion back (who, when, why are "
                                             "recorded on the version)")
    models.add_argument("action", choices=("list", "promote", "rollback", "restore"),
                        help="restore: pull a version's artifacts (artifacts/DATASET/) from the DVC remote")
    models.add_argument("name", metavar="DATASET", help="one of params.yaml's datasets")
    models.add_argument("version", type=int, nargs="?",
                        help="promote: the version to serve; rollback: the version to return to "
                             "(default: the one the champion replaced); restore: the version to pull")
    models.add_argument("--reason", default="", help="why (recorded with the change)")
    batch = verbs.add_parser("add-batch", help="check a folder of captioned images, add it to data/DATASET/ "
                                               "(dvc add data) and announce it to the retraining deployments")
    batch.add_argument("name", metavar="DATASET", help="one of params.yaml's datasets")
    batch.add_argument("folder", help="images + captions.jsonl or captions.csv")
    batch.add_argument("--batch-name", default=None, help="the batch's folder name (default: the folder's name)")
    batch.add_argument("--no-event", action="store_true", help="do not send the clipcap.batch.added event")
    serve = verbs.add_parser("serve", help="serve a registered model over HTTP (MLflow's scoring app, within the "
                                           "model's serve limits: requests at once, a bounded queue, body size)")
    serve.add_argument("--model", default=None,
                       help="an MLflow model URI (default: models:/clipcap-DATASET@champion)")
    serve.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from params.yaml)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5000, help="(default: 5000)")
    interpret = verbs.add_parser("interpret", help="show each prefix vector's nearest vocabulary tokens")
    interpret.add_argument("image")
    _add_model_options(interpret)
    interpret.add_argument("--top-k", type=int, default=5)
    return parser


def image_files(items: list[str]) -> list[str]:
    """Files as given, folders expanded to their images (sorted); a missing one is an error."""
    found: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            images = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise ClipcapError(f"{item}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += images
        elif path.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"image not found: {item}")
    return found


def _load_captioner(args: argparse.Namespace):
    from clipcap.modeling.captioner import Captioner

    model = args.model or str(_layout(args).model)
    if model.startswith(("models:/", "runs:/")):
        from clipcap.pipeline.registry import download_captioner

        tracking_uri = args.tracking_uri or load_config(args.params, args.dataset).register.tracking_uri
        model = download_captioner(model, tracking_uri)
    return Captioner.load(model, device=args.device)


def _layout(args: argparse.Namespace):
    from clipcap.pipeline.layout import Layout

    return Layout.of(load_config(args.params, args.dataset).dataset.name)


def _caption(args: argparse.Namespace) -> None:
    import torch

    decoding = config_from_mapping(
        DecodingConfig, {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodingConfig)}, "caption")
    paths = image_files(args.images)
    captioner = _load_captioner(args)
    torch.manual_seed(args.seed)
    found = captioner.iter_captions(paths, decoding, batch_size=args.batch_size, num_workers=args.workers,
                                    progress=len(paths) > args.batch_size)
    tsv = csv.writer(sys.stdout, delimiter="\t", lineterminator="\n")
    for path, captions in zip(paths, found):
        if args.format == "jsonl":
            print(json.dumps({"image": path, "captions": captions}, ensure_ascii=False), flush=True)
        else:
            tsv.writerows([path, text] for text in captions)
            sys.stdout.flush()


def _interpret(args: argparse.Namespace) -> None:
    from clipcap.modeling.interpret import nearest_tokens

    path = image_files([args.image])[0]
    captioner = _load_captioner(args)
    embedding = captioner.embed([path])[0]
    caption = captioner.caption_embeddings(embedding[None], DecodingConfig())[0][0]
    print(f"{path}: {caption}")
    for position, tokens in enumerate(nearest_tokens(captioner.model, captioner.tokenizer, embedding, args.top_k)):
        print(f"prefix {position + 1:2d}: " + "  ".join(f"{t.token!r} {t.cosine:.2f}" for t in tokens))


def _models(args: argparse.Namespace) -> None:
    from clipcap.pipeline import models

    cfg = load_config(args.params, args.name)  # that dataset's register section (its tracking store)
    if args.action == "list":
        for row in models.list_versions(cfg.register, args.name):
            print(row.line(cfg.register.metric))
    elif args.action == "promote":
        if args.version is None:
            raise ClipcapError("models promote: name the version to make champion")
        print(f"clipcap-{args.name} version {args.version} is the champion: "
              f"{models.promote(cfg.register, args.name, args.version, args.reason)}")
    elif args.action == "rollback":
        version, why = models.rollback(cfg.register, args.name, args.version, args.reason)
        print(f"clipcap-{args.name} version {version} is the champion: {why}")
    else:
        if args.version is None:
            raise ClipcapError("models restore: name the version to restore")
        restored = models.restore(cfg.register, args.name, args.version, Path(args.params).resolve().parent)
        scores = ", ".join(f"{k.removeprefix('model_')} {v:.4f}" for k, v in sorted(restored.metrics.items()))
        print(f"restored artifacts/{args.name}/ of clipcap-{args.name} version {restored.version} "
              f"(run {restored.run_id}; stages {', '.join(restored.stages)}); its test metrics: {scores}")


def _serve(args: argparse.Namespace) -> None:
    import mlflow

    from clipcap.pipeline.registry import model_name
    from clipcap.pipeline.server import serve

    cfg = None if args.model and args.tracking_uri else load_config(args.params, args.dataset)
    mlflow.set_tracking_uri(args.tracking_uri or cfg.register.tracking_uri)
    serve(args.model or f"models:/{model_name(cfg.dataset.name)}@champion", args.host, args.port)


def _add_batch(args: argparse.Namespace) -> None:
    from clipcap.pipeline.batches import add_batch

    added = add_batch(load_config(args.params, args.name), args.folder, Path(args.params).resolve().parent,
                      args.batch_name, send_event=not args.no_event)
    quarantined = ", ".join(f"{k} {v}" for k, v in added.quarantined.items()) or "none"
    print(f"{added.dataset}: batch {added.name} added to {added.path} ({added.images} images; rows validate will "
          f"quarantine: {quarantined}); {'recorded in data.dvc' if added.tracked else 'not a DVC project: not dvc-added'}"
          f"; {'clipcap.batch.added sent' if added.announced else 'no event sent'}")


def main(argv: list[str] | None = None) -> int:
    apply_offline_env()
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "great_expectations", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.verb == "caption":
            _caption(args)
        elif args.verb == "interpret":
            _interpret(args)
        elif args.verb == "datastore":
            from clipcap.pipeline.datastore import extend_datastore

            update = extend_datastore(args.model or _layout(args).model, args.folder)
            print(f"{update.added} captions added ({update.already_there} already there; skipped rows: "
                  f"{update.skipped or 'none'}); the datastore holds {update.size}")
        elif args.verb == "models":
            _models(args)
        elif args.verb == "serve":
            _serve(args)
        elif args.verb == "add-batch":
            _add_batch(args)
        elif args.verb == "summary":
            from clipcap.pipeline.reports import summary

            print(summary(_layout(args)))
        elif args.verb == "datasets":
            print("\n".join(dataset_names(read_params(args.params))))
        else:  # a stage: it reads and writes artifacts/<dataset>/
            stage = importlib.import_module(f"clipcap.pipeline.stages.{args.verb}")
            cfg = load_config(args.params, args.dataset)
            options = {"resume": args.resume} if args.verb == "train" else {}
            if getattr(args, "part", None):   # embed, evaluate
                options = {"part": importlib.import_module("clipcap.pipeline.parts").parse_part(args.part)}
            stage.run(cfg, **options)
    except (ClipcapError, FileNotFoundError) as err:  # a readable message; the traceback with -v
        if args.verbose:
            raise
        print(f"clipcap {args.verb}: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a tracking database another process holds locked, met anywhere: one line too
        from clipcap.pipeline.store_errors import locked_store

        locked = locked_store(err, _tracking_uri(args))
        if locked is None or args.verbose:
            raise
        print(f"clipcap {args.verb}: error: {locked}", file=sys.stderr)
        return 1
    return 0


def _tracking_uri(args: argparse.Namespace) -> str:
    """The tracking store the command used: ``--tracking-uri``, else its dataset's ``register.tracking_uri``."""
    if getattr(args, "tracking_uri", None):
        return args.tracking_uri
    try:
        return load_config(args.params, getattr(args, "name", None) or args.dataset).register.tracking_uri
    except Exception:  # params.yaml itself unreadable: the default store
        from clipcap.config import RegisterConfig

        return RegisterConfig().tracking_uri


if __name__ == "__main__":
    sys.exit(main())
