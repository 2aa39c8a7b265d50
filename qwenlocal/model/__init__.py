"""The Qwen3-MoE model: config, attention and MoE block, KV cache, RoPE, the CUDA-graph decode, and the self-check of the GPU's fast paths."""
