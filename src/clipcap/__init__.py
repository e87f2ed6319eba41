"""clipcap: ClipCap image captioning (image embedding -> mapping network -> LM prefix)."""

__version__ = "0.1.0"
