"""``clipcap <verb>``: the one command line for the pipeline stages and for inference.

Stages (what ``dvc.yaml`` runs): fetch, validate, embed, train, evaluate, register.
Inference: ``clipcap caption IMAGE... --model PATH_OR_MODELS_URI``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from clipcap.environment import apply_offline_env
from clipcap.errors import ClipcapError

STAGES = ("fetch", "validate", "embed", "train", "evaluate", "register")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for stage in STAGES:
        verbs.add_parser(stage, help=f"run the {stage} stage")
    verbs.add_parser("summary", help="print the metrics, samples and registered model of the last run")
    caption = verbs.add_parser("caption", help="caption images with a trained model")
    caption.add_argument("images", nargs="+", help="image files")
    caption.add_argument("--model", default="artifacts/model",
                         help="captioner folder or MLflow URI such as models:/clipcap-tuxpaint@champion")
    caption.add_argument("--num-beams", type=int, default=5)
    caption.add_argument("--max-new-tokens", type=int, default=20)
    caption.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from params.yaml)")
    return parser


def _caption(args: argparse.Namespace) -> None:
    from clipcap.captioner import Captioner

    model = args.model
    if model.startswith(("models:/", "runs:/")):
        from clipcap.config import load_config
        from clipcap.registry import download_captioner

        tracking_uri = args.tracking_uri or load_config(args.params).register.tracking_uri
        model = download_captioner(model, tracking_uri)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}")
    captioner = Captioner.load(model)
    for path, text in zip(args.images, captioner.caption(args.images, num_beams=args.num_beams,
                                                          max_new_tokens=args.max_new_tokens)):
        print(f"{path}\t{text}")


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
        else:
            from clipcap import stages
            from clipcap.config import load_config

            cfg = load_config(args.params)
            if args.verb == "summary":
                print(stages.summary(cfg))
            else:
                getattr(stages, args.verb)(cfg)
    except (ClipcapError, FileNotFoundError) as err:  # a readable message; the traceback with -v
        if args.verbose:
            raise
        print(f"clipcap {args.verb}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
