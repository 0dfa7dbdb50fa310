"""Writers/readers of quantised checkpoints (one module per format)."""
