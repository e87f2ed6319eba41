"""Captions of eight everyday photos the captioner never saw, beside the retrieval and label baselines'.

The photos ship with scikit-image (astronaut, chelsea, coffee, rocket, stereo_motorcycle),
scikit-learn (china, flower) and matplotlib (grace_hopper). The retrieval baseline is the caption
of the nearest training image, the label baseline "A <the encoder's ImageNet top-1 label>.", the same
baselines ``clipcap evaluate`` scores. A caption names the photo's main object when one of its words
(lemmatised) is one of ``MAIN_OBJECT``'s for that photo; the last row counts them per system.

    python benchmarks/unseen_photos.py [--dataset tuxpaint] [--model artifacts/<dataset>/model] [--artifacts artifacts/<dataset>]
                                       [--refresh]

Prints a Markdown table (and writes it to ``--output`` when given).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from clipcap.config import load_config  # noqa: E402
from clipcap.modeling.captioner import Captioner  # noqa: E402
from clipcap.modeling.labels import encoder_labels, label_caption  # noqa: E402
from clipcap.modeling.retrieval import CaptionDatastore  # noqa: E402
from clipcap.pipeline.layout import Layout  # noqa: E402
from clipcap.naming import lemma, words  # noqa: E402
from clipcap.pipeline.splits import split_data  # noqa: E402

MAIN_OBJECT = {"astronaut": {"astronaut", "person", "man", "woman", "spaceman"}, "chelsea": {"cat", "kitten"},
               "coffee": {"coffee", "cup", "mug", "espresso"}, "rocket": {"rocket"},
               "stereo_motorcycle": {"motorcycle", "moped", "motorbike", "scooter"}, "china": {"building", "palace",
               "temple", "pagoda", "house"}, "flower": {"flower", "blossom", "dahlia"},
               "grace_hopper": {"woman", "person", "officer", "lady"}}


def names_main_object(photo: str, caption: str) -> bool:
    return bool(MAIN_OBJECT[photo] & {lemma(w) for w in words(caption)})


def photos(folder: Path) -> list[Path]:
    import matplotlib.cbook
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    arrays["stereo_motorcycle"] = data.stereo_motorcycle()[0]
    arrays.update(zip(("china", "flower"), load_sample_images().images))
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        arrays["grace_hopper"] = np.asarray(Image.open(handle).convert("RGB"))
    paths = []
    for name, array in arrays.items():
        path = folder / f"{name}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="one of params.yaml's datasets (default: the first)")
    parser.add_argument("--model", default=None, help="default: artifacts/<dataset>/model")
    parser.add_argument("--artifacts", type=Path, default=None, help="default: artifacts/<dataset>")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--refresh", action="store_true",
                        help="first set the model's entity head to params.yaml's inference settings and the current "
                             "noun table (a model kept from an earlier commit; rewrites its config.json)")
    args = parser.parse_args()
    cfg = load_config(args.params, args.dataset)
    args.artifacts = args.artifacts or Layout.of(cfg.dataset.name).root
    args.model = args.model or str(args.artifacts / "model")
    if args.refresh:
        from kept_runs import refresh_entities  # benchmarks/kept_runs.py

        refresh_entities(cfg, Path(args.model), args.artifacts)
    captioner = Captioner.load(args.model)
    (rows, embeddings), = split_data(Layout(args.artifacts), captioner.config["encoder"], "train")
    training = CaptionDatastore.build(embeddings, [c[0] for c in rows["captions"]], rows["image_id"].tolist())
    with tempfile.TemporaryDirectory() as folder:
        paths = photos(Path(folder))
        found = captioner.embed(paths)
        captions = captioner.caption_embeddings(found, cfg.evaluate.decoding)
        nearest = training.nearest(found, 1)
    labels = encoder_labels(captioner.encoder)
    labelled = ([label_caption(top[0].name) for top in labels.top(found, k=1)] if labels is not None
                else ["-"] * len(paths))
    systems = {"model": [c[0] for c in captions], "retrieval baseline": [n[0] for n in nearest],
               "label baseline": labelled}
    lines = ["| photo | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for index, path in enumerate(paths):
        cells = [f"{found[index]}{' ✓' if names_main_object(path.stem, found[index]) else ''}"
                 for found in systems.values()]
        lines.append(f"| {path.stem} | " + " | ".join(cells) + " |")
    named = [sum(names_main_object(p.stem, c) for p, c in zip(paths, found)) for found in systems.values()]
    lines.append("| **names the main object** | " + " | ".join(f"**{n} of {len(paths)}**" for n in named) + " |")
    table = "\n".join(lines) + "\n"
    if args.output:
        args.output.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
