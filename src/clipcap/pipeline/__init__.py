"""The pipeline: the DVC stages (``stages/``, one small module each) and what they share -- where
files go (``layout``), the embedding store, the baselines, the metrics, the MLflow registry and
the served pyfunc model, and the human-readable reports."""

STAGES = ("fetch", "validate", "embed", "train", "evaluate", "register")
