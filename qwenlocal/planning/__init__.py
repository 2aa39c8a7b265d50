"""Deciding a load before it happens: the flags, the frozen load plan, the memory model, GPUs, `vram`, the expert-cache simulator."""
