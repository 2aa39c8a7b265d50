"""Decode tok/s with and without a JSON schema, in one run: the cost of constrained decoding.

The checkpoint has Qwen3-30B-A3B's real layer shapes and vocabulary (bench/common.py) and a few
layers. Three engines take turns, best of N rounds each, on the same chat prompt: free greedy
decoding, greedy decoding under a schema with the grammar's mask computed on a worker thread while
the model runs (the server's way), and the same with the mask computed in line (no overlap). The
schema keeps the reply open (an array of at least 1000 short strings), so every round decodes
the same number of tokens.

    python bench/constrained.py --layers 2 --decode 64 --rounds 3
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, markdown_table, real_shape_checkpoint

from qwenlocal import load_model
from qwenlocal.generation.generate import Generator, SamplingParams
from qwenlocal.generation.grammar import Constraint, Tokens, grammar_tokenizer, json_body, lark
from qwenlocal.generation.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1000}
    },
    "required": ["notes"],
}
QUESTION = [{"role": "user", "content": "Write notes about the weather in Paris, as JSON."}]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()

    folder = real_shape_checkpoint(args.layers)
    model = load_model(folder, dtype=args.dtype)
    tok = Tokenizer.from_dir(folder)
    vocab, eos = model.config.vocab_size, tok.eos_token_ids
    grammar_tokenizer(tok, vocab, eos)  # built once per server; not part of a reply's time
    prompt = tok.encode_chat(QUESTION, enable_thinking=False)
    grammar = lark(json_body(SCHEMA), Tokens.of(tok), thinking=False, in_reasoning=False)
    gen = Generator(model, tok, ctx_size=len(prompt) + args.decode + 8)
    greedy = SamplingParams(temperature=0)
    engines = {
        "free": lambda: None,
        "schema, mask overlapped": lambda: Constraint(grammar, tok, vocab, eos, overlap=True),
        "schema, mask in line": lambda: Constraint(grammar, tok, vocab, eos, overlap=False),
    }
    gen.run(prompt[:8], greedy, max_tokens=2, eos_ids=())  # warm-up
    best: dict[str, float] = {}
    texts: dict[str, str] = {}
    tokens: list[int] = []
    for _ in range(args.rounds):
        for name, make in engines.items():  # interleaved: neighbours on a shared machine hit all alike
            gen.reset()
            s = gen.run(prompt, greedy, max_tokens=args.decode, eos_ids=(), constraint=make())
            assert s.generated_tokens == args.decode, (name, s.generated_tokens)
            best[name] = max(best.get(name, 0.0), s.gen_tps)
            texts[name] = s.text
            if name == "schema, mask overlapped":
                tokens = s.token_ids

    # the mask alone, along the constrained reply's tokens
    c = Constraint(grammar, tok, vocab, eos, overlap=False)
    ids = tokens
    t = time.perf_counter()
    for i in ids:
        c.allowed()
        c.advance(i)
    mask_ms = (time.perf_counter() - t) / len(ids) * 1e3

    free = best["free"]
    rows = [[name, f"{tps:.2f}", f"{tps / free:.3f}"] for name, tps in best.items()]
    print(f"machine: {machine()}")
    print(
        f"{args.layers} layers, real shapes, {args.dtype}; prompt {len(prompt)} tokens, {args.decode} decoded, best of {args.rounds}"
    )
    print(markdown_table(["decode", "tok/s", "x free"], rows))
    print(f"mask alone (compute + consume + bits to bool): {mask_ms:.3f} ms/token over {len(ids)} tokens")
    print("reply under the schema begins:", repr(texts["schema, mask overlapped"][:60]))


if __name__ == "__main__":
    main()
