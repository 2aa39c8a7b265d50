"""Expert storage and its cache: the host store (pinned), GPU slots, cache policies and counters, cold experts on the CPU."""
