"""meft-convert: turn pretrained transformers checkpoints into exact-reversible MEFT models."""

__version__ = "0.1.0"
