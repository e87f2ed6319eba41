"""Where each stage reads and writes: one folder per dataset, ``artifacts/<dataset>/`` under the
project root.

The folder is fixed, not a parameter: ``dvc.yaml`` names these paths as stage outputs, so a
configurable root could only disagree with it. Tests pass another root to the stage functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARTIFACTS = Path("artifacts")


@dataclass(frozen=True)
class Layout:
    root: Path = ARTIFACTS

    @classmethod
    def of(cls, dataset: str) -> Layout:
        """The folder of one dataset's artifacts: ``artifacts/<dataset>``."""
        return cls(ARTIFACTS / dataset)

    raw_manifest = property(lambda self: self.root / "raw_manifest.parquet")  # fetch: every input row
    digest_cache = property(lambda self: self.root / "digests.sqlite")  # fetch: image digests by (path, size, mtime)
    manifest = property(lambda self: self.root / "manifest.parquet")  # validate: the clean manifest, read downstream
    validation_dir = property(lambda self: self.root / "validation")
    validation_report = property(lambda self: self.validation_dir / "report.json")
    validation_markdown = property(lambda self: self.validation_dir / "report.md")
    quarantine = property(lambda self: self.validation_dir / "quarantine.jsonl")
    embeddings = property(lambda self: self.root / "embeddings")
    embed_summary = property(lambda self: self.root / "embed.json")  # embed: images encoded by the last run
    model = property(lambda self: self.root / "model")
    checkpoints = property(lambda self: self.root / "checkpoints")
    training_dir = property(lambda self: self.root / "training")
    train_log = property(lambda self: self.training_dir / "loss.csv")
    train_summary = property(lambda self: self.training_dir / "summary.json")
    learning_curve = property(lambda self: self.training_dir / "curve.csv")  # per epoch: losses, val CIDEr
    metrics = property(lambda self: self.root / "metrics.json")
    score_chart = property(lambda self: self.root / "scores.png")  # evaluate: each system's scores, 95 % intervals
    curve_chart = property(lambda self: self.root / "learning_curve.png")  # evaluate: val loss and CIDEr per epoch
    caption_parts = property(lambda self: self.root / "caption-parts")  # evaluate --part: test captions made ahead
    evaluation_dir = property(lambda self: self.root / "evaluation")
    predictions = property(lambda self: self.evaluation_dir / "predictions.jsonl")
    samples = property(lambda self: self.evaluation_dir / "samples.md")
    gallery = property(lambda self: self.evaluation_dir / "gallery.html")
    registered = property(lambda self: self.root / "registered.json")
