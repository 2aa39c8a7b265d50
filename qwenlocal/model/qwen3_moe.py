"""Qwen3-MoE forward pass in plain PyTorch, with Hugging Face's module and weight names.

Attention (q_norm/k_norm, RoPE, grouped-query SDPA over a preallocated KV cache), the sparse
MoE block (router softmax in fp32 -> top-k -> renormalise), dense MLP layers, final norm and
lm_head. Expert weights are reached only through an `Experts` object, so the quantized and
offloaded variants plug in without touching this file.

A forward's positions are a device tensor (`Step`): RoPE, the KV-cache write and the mask are
computed from it on the device, so a decode step makes no host reads and can be captured as a
CUDA graph and replayed (qwenlocal.model.graphs). On the CPU a decode token runs each layer up to
its experts as one C++ call (cpu_decode: the same ops, prepared at load by DecoderLayer.fuse_decode);
the Python layers here stay its reference and fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenlocal.experts.store import DenseExperts, Experts
from qwenlocal.model import cpu_decode
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.model.kv_cache import KVCache
from qwenlocal.model.rope import Rope, apply_rope

# Keys one attention call scores per query row at most (masked_attention): bounds a long context's
# prefill scores to what the memory model counts.
ATTENTION_SCORE_KEYS = 4096
# Where load_model stacks q/k/v into one matmul (Attention.fuse_qkv): the devices on which the tests
# hold it equal to three, bit for bit, and the weight formats whose rows stack (None: 16-bit).
FUSED_QKV_DEVICES = ("cpu",)
FUSED_QKV_FORMATS = (None, "int8")


def qk_norm_shape(config: Qwen3MoeConfig) -> tuple[int, int, int]:
    """The q_norm and k_norm weights repeated per head, [H + KV, 1, D]: what a fused layer holds."""
    return (config.num_attention_heads + config.num_key_value_heads, 1, config.head_dim)


class Linear(nn.Module):
    """y = x W^T (+ b). A plain module so the quantizer can swap it for a quantized one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def concat_rows(cls, layers: list[Linear]) -> Linear | None:
        """One layer whose output is the layers' outputs side by side (their weights' rows stacked);
        each layer's weight (and bias) becomes a view into it, so no weight is held twice. None
        where the layers do not stack (another class, dtype, device or bias)."""
        first = layers[0]
        if any(
            type(m) is not cls
            or m.in_features != first.in_features
            or m.weight.dtype != first.weight.dtype
            or m.weight.device != first.weight.device
            or (m.bias is None) != (first.bias is None)
            for m in layers
        ):
            return None
        with torch.device("meta"):
            fused = cls(first.in_features, sum(m.out_features for m in layers), first.bias is not None)
        names = ("weight",) if first.bias is None else ("weight", "bias")
        for name in names:
            whole = torch.cat([getattr(m, name) for m in layers])
            setattr(fused, name, nn.Parameter(whole, requires_grad=False))
            for m, part in zip(layers, whole.split([m.out_features for m in layers]), strict=True):
                setattr(m, name, nn.Parameter(part, requires_grad=False))
        return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x normalized over its last dim in fp32, cast back to x's dtype), as transformers
    computes it. torch's rms_norm already accumulates a 16-bit x in fp32 and rounds once at the end,
    so it is called on x itself: bit for bit the same as on x.float() then cast back (the tests hold
    it to that), in two ops instead of four."""
    return weight * F.rms_norm(x, x.shape[-1:], eps=eps)


@dataclass
class Step:
    """Where one forward's T tokens go: their positions [T] on the device, RoPE tables for them,
    the cache, how many stored keys attention reads (None: all of them, masked, for a step of
    fixed shape), the mask or causal flag, and whether layers prepared for it (DecoderLayer.
    fuse_decode) run the token as one call of cpu_decode's operator."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache: KVCache | None
    end: int | None
    mask: torch.Tensor | None
    causal: bool
    layer_op: bool = False


class Attention(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, layer: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer, self.head_dim = layer, d
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = Linear(h, self.n_heads * d, bias)
        self.k_proj = Linear(h, self.n_kv * d, bias)
        self.v_proj = Linear(h, self.n_kv * d, bias)
        self.o_proj = Linear(self.n_heads * d, h, bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        # fuse_qkv's one-token path, out of the state_dict (the checkpoint is unchanged); the
        # projection's weight is q/k/v's storage, the norm weights per head a buffer of their own
        self.__dict__["qkv"] = None
        self.register_buffer("qk_norm_weight", None, persistent=False)

    def fuse_qkv(self) -> bool:
        """Compute a decode token's q, k and v with one matmul: the three weights' rows stacked into
        one matrix (q_proj, k_proj and v_proj then hold views of it), which gives each row's output
        bit for bit where the kernel computes each output row on its own (tests/test_decode_fast.py).
        False (nothing changed) where the weights do not stack."""
        projections = [self.q_proj, self.k_proj, self.v_proj]
        fused = type(self.q_proj).concat_rows(projections)
        if fused is None:
            return False
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        norms = (self.q_norm.weight.expand(h, d), self.k_norm.weight.expand(kv, d))
        self.__dict__["qkv"] = fused
        self.qk_norm_weight = torch.cat(norms).unsqueeze(1)  # qk_norm_shape
        return True

    def _apply(self, fn, recurse: bool = True):
        # moved or cast, q/k/v no longer share the fused matrix: decode goes back to three matmuls
        self.__dict__["qkv"], self.qk_norm_weight = None, None
        return super()._apply(fn, recurse)

    def project(self, x: torch.Tensor, s: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> q [B, H, T, D], k and v [B, KV, T, D]: normed, and q and k rotated."""
        b, t, _ = x.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        if t == 1 and self.qkv is not None:
            # one token: [B, 1, heads, D] is [B, heads, 1, D] in memory, so no transposes; q and k
            # normed and rotated in one pass each (every row on its own: the same numbers)
            y = self.qkv(x).view(b, h + 2 * kv, 1, d)
            qk = apply_rope(rms_norm(y[:, : h + kv], self.qk_norm_weight, self.q_norm.eps), s.cos, s.sin)
            return qk[:, :h], qk[:, h:], y[:, h + kv :]
        q = self.q_norm(self.q_proj(x).view(b, t, h, d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, kv, d)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, kv, d).transpose(1, 2)
        return apply_rope(q, s.cos, s.sin), apply_rope(k, s.cos, s.sin), v

    def forward(self, x: torch.Tensor, s: Step) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, s)
        if s.cache is not None:
            k, v = s.cache.update(self.layer, k, v, s.positions, s.end)
        if t == 1:  # one query: each KV head's query heads become its rows (no K/V copies for GQA)
            rows = q.reshape(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
            out = F.scaled_dot_product_attention(rows, k, v, attn_mask=s.mask).view(b, self.n_heads, 1, -1)
        elif s.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, enable_gqa=True)
        else:
            out = masked_attention(q, k, v, s.mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D] against k, v [B, KV, S, D] through mask [T, S] (True: attend) -> [B, H, T, D].

    A prefill chunk after cached tokens. SDPA with a mask and enable_gqa takes the math kernel on
    CUDA, which copies K/V to all H heads and materializes [H, T, S] fp32 scores (5 GiB at 32K
    keys). Here each KV head takes its query heads as rows (no K/V copies, as in decode), and the
    queries go in slices of at most T * ATTENTION_SCORE_KEYS // S, so no call holds more scores
    than T x ATTENTION_SCORE_KEYS per head, whatever kernel runs: the memory model's bound."""
    b, h, t, d = q.shape
    kv, keys = k.shape[1], k.shape[2]
    group = h // kv
    step = max(1, t * ATTENTION_SCORE_KEYS // keys)
    outs = []
    for i in range(0, t, step):
        rows = q[:, :, i : i + step]
        r = rows.shape[2]
        m = mask[i : i + step].repeat(group, 1)  # row j*r + x: query head j of the group, query x
        out = F.scaled_dot_product_attention(rows.reshape(b, kv, group * r, d), k, v, attn_mask=m)
        outs.append(out.view(b, h, r, d))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class MLP(nn.Module):
    """The dense SiLU-gated MLP of layers listed in mlp_only_layers."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, layer: int, experts: Experts):
        super().__init__()
        self.layer = layer
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts)
        # Shared by every layer and owned by the top-level model: kept out of this module's state.
        self.__dict__["experts"] = experts

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (expert ids [N, k], weights [N, k] in x's dtype)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        ids, weights = self.route(flat)
        return self.experts(self.layer, flat, ids, weights).view(b, t, h)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, layer: int, experts: Experts):
        super().__init__()
        self.self_attn = Attention(config, layer)
        if config.is_moe_layer(layer):
            self.mlp: nn.Module = SparseMoeBlock(config, layer, experts)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.__dict__["decode_args"] = None  # fuse_decode's operands (cpu_decode.LayerArgs)

    def fuse_decode(self) -> bool:
        """Let a CPU decode token run this layer up to its experts as one call of cpu_decode's
        operator (bit for bit the Python layer's ops), after Attention.fuse_qkv. False (nothing
        changed) where a weight is not one the operator computes as the Python layer does."""
        attn, mlp = self.self_attn, self.mlp
        dtype = self.input_layernorm.weight.dtype
        moe = isinstance(mlp, SparseMoeBlock)
        if attn.qkv is None or attn.qk_norm_weight is None:
            return False
        linears = [decode_parts(m, dtype) for m in (attn.qkv, attn.o_proj, *([mlp.gate] if moe else []))]
        if any(p is None for p in linears):
            return False
        args = cpu_decode.layer_args(
            attn.layer,
            (self.input_layernorm.weight, attn.qk_norm_weight, self.post_attention_layernorm.weight),
            (linears[0], linears[1], linears[2] if moe else None),
            (attn.n_heads, attn.n_kv, attn.head_dim, mlp.top_k if moe else 0),
            (self.input_layernorm.eps, attn.q_norm.eps, self.post_attention_layernorm.eps),
            moe and mlp.norm_topk_prob,
        )
        self.__dict__["decode_args"] = args
        return args is not None

    def _apply(self, fn, recurse: bool = True):
        self.__dict__["decode_args"] = None  # moved or cast: the operands are no longer the weights
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, s: Step) -> torch.Tensor:
        if s.layer_op and self.decode_args is not None:
            x, h, ids, weights = cpu_decode.decode_layer(
                x, s.cos, s.sin, s.positions, s.cache, s.end, self.decode_args
            )
            if not isinstance(self.mlp, SparseMoeBlock):
                return x + self.mlp(h)
            return x + self.mlp.experts(self.mlp.layer, h, ids, weights).view(x.shape)
        x = x + self.self_attn(self.input_layernorm(x), s)
        return x + self.mlp(self.post_attention_layernorm(x))


def decode_parts(m: nn.Module, dtype: torch.dtype) -> cpu_decode.LinearParts | None:
    """A linear layer's operands for cpu_decode, where its one-row forward is what the operator
    computes: a 16-bit Linear in x's dtype (F.linear), or an int8 QuantLinear on its kernel."""
    if type(m) is Linear:
        return cpu_decode.LinearParts(m.weight, None, m.bias) if m.weight.dtype == dtype else None
    return cpu_decode.quant_linear_parts(m, dtype)


class Qwen3MoeModel(nn.Module):
    def __init__(self, config: Qwen3MoeConfig, experts: Experts):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, i, experts) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3MoeForCausalLM(nn.Module):
    """Call on input_ids [B, T]: logits [B, T, vocab] (float32) for a fresh sequence,
    or, with a cache, for the tokens that follow what the cache already holds."""

    def __init__(self, config: Qwen3MoeConfig, experts: Experts | None = None):
        super().__init__()
        self.config = config
        self.experts = experts if experts is not None else DenseExperts(config)
        self.model = Qwen3MoeModel(config, self.experts)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.rope: Rope | None = None
        self.plan = None  # plan.LoadPlan: how the loader built it (None for a model built by hand)
        self.graph_decode = True  # False: decode eagerly (the self-check saw the graph fail here)

    @property
    def recipe(self):
        """The quantization recipe it was loaded with (quant.recipe.Recipe); None: 16-bit."""
        return None if self.plan is None else self.plan.recipe

    @property
    def kv_dtype(self) -> torch.dtype | None:
        """KV cache storage (None: the model's dtype)."""
        return None if self.plan is None else self.plan.kv_dtype

    @property
    def device(self) -> torch.device:
        """The compute device (the token embedding may stay in host RAM beside a GPU)."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope_tables(self, max_len: int) -> Rope:
        if self.rope is None or self.rope.max_len < max_len or self.rope.cos.device != self.device:
            length = max(max_len, self.config.native_context if self.rope is None else 0)
            self.rope = Rope(self.config, length, self.device)
        return self.rope

    def new_cache(self, max_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> KVCache:
        dtype = dtype or self.kv_dtype or self.dtype
        return KVCache(self.config, max_len, batch, dtype, self.device, compute_dtype=self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        t = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + t, device=self.device)
        logits = self.step(self.embed(input_ids), positions, cache, start + t, last_only)
        if cache is not None:
            cache.length = start + t
        return logits

    @property
    def input_device(self) -> torch.device:
        """Where token ids should be made: the embedding's device (host RAM beside a GPU)."""
        return self.model.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids.to(self.input_device)).to(self.device)

    def step(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        end: int | None,
        last_only: bool = False,
        span: int | None = None,
    ) -> torch.Tensor:
        """Embedded tokens x [B, T, H] at `positions` [T] (device) -> logits. `end`: keys stored
        after this step (None: a step of fixed shape, which attends over the first `span` stored
        keys through a mask, or over the whole cache when `span` is None)."""
        b, t, _ = x.shape
        rope = self.rope_tables(end if end is not None else cache.max_len)
        cos, sin = rope.at(positions, self.dtype)
        reads = end if end is not None else span  # stored keys attention reads (None: all)
        if cache is None or end == t:
            mask, causal = None, t > 1
        elif t == 1 and end is not None:
            mask, causal = None, False  # one query sees every stored key
        else:  # query i sees keys 0..positions[i]
            keys = torch.arange(reads if reads is not None else cache.max_len, device=x.device)
            mask, causal = keys[None, :] <= positions[:, None], False
        # one row with its keys counted: prepared layers may run it as one call each (cpu_decode)
        layer_op = (
            b * t == 1
            and end is not None
            and cache is not None
            and self.model.layers[0].decode_args is not None
            and cpu_decode.takes(x, cache, end)
        )
        s = Step(positions, cos, sin, cache, reads, mask, causal, layer_op)
        prefetch = self.experts.prefetch if b * t == 1 else None
        for i, layer in enumerate(self.model.layers):
            x = layer(x, s)
            if prefetch is not None and i + 1 < len(self.model.layers):
                prefetch(i + 1, x)  # start copying the next layer's likely experts
        self.experts.end_step()
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()
