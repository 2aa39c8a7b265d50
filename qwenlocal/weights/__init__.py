"""Checkpoints on disk: finding and reading sources (16-bit, GPTQ, FP8), quantizing (once into the cache), loading into a model."""
