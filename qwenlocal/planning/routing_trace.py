"""Routing traces: the experts each token picked in every MoE layer, in memory and in files.

A trace is a list over tokens of a list over MoE layers of the expert ids picked:
`trace[t][layer] == [e0, ..., e_{k-1}]`. Files are JSON lines, one token per line:
`{"experts": [[layer 0 ids], ...]}` (`--record-routing FILE` writes them).
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

Trace = list[list[list[int]]]


def as_trace(trace) -> Trace:
    """A trace as nested lists of ints, from lists or an int array [tokens, layers, k]."""
    if hasattr(trace, "tolist"):
        trace = trace.tolist()
    trace = [[[int(e) for e in ids] for ids in token] for token in trace]
    if trace and any(len(token) != len(trace[0]) for token in trace):
        raise ValueError("every token of a trace must list the same number of layers")
    return trace


class TraceWriter:
    """Streams a routing trace to JSON lines, one token per `add`.

    Lines go to a temporary file beside `path`, renamed onto it by `close`: a reader never sees
    a half-written trace. Leaving a `with` block by an exception, or dropping the writer without
    `close`, deletes the temporary file. Call `close` yourself to keep a partial trace.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self._discard = weakref.finalize(self, _discard, self._file, self._tmp)
        self.tokens = 0

    def add(self, token_experts: Sequence[Sequence[int]]) -> None:
        """One token: for each MoE layer, the ids of the experts it picked."""
        ids = [[int(e) for e in layer] for layer in token_experts]
        self._file.write(json.dumps({"experts": ids}, separators=(",", ":")) + "\n")
        self.tokens += 1

    def close(self) -> None:
        """Finish the file and move it to `path`."""
        if not self._discard.alive:
            return
        self._discard.detach()
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop what was written; `path` is left untouched."""
        self._discard()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _discard(file, tmp: Path) -> None:
    file.close()
    tmp.unlink(missing_ok=True)


def write_trace(path: str | os.PathLike, trace) -> None:
    """Write a whole trace (nested lists or an int array [tokens, layers, k])."""
    with TraceWriter(path) as w:
        for token in as_trace(trace):
            w.add(token)


def read_trace(path: str | os.PathLike) -> Trace:
    """Read a JSON-lines trace; ValueError naming the line if it is malformed."""
    trace: Trace = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token = json.loads(line)["experts"]
                token = [[int(e) for e in ids] for ids in token]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a routing trace line ({e})") from None
            if trace and len(token) != len(trace[0]):
                raise ValueError(f"{path}:{n}: {len(token)} layers, earlier lines have {len(trace[0])}")
            trace.append(token)
    return trace
