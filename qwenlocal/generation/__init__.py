"""Generation: tokenizer and chat template, sampling and the decode loop, constrained decoding and tool-call parsing, the serving engine."""
