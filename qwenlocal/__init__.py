"""qwenlocal: Qwen3-30B-A3B (and the Qwen3 MoE family) on one GPU."""

from qwenlocal.model.config import Qwen3MoeConfig

from .errors import UserError

__all__ = ["Qwen3MoeConfig", "UserError", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the loader (and the model, experts and memory model behind it) is imported when first used:
    # `qwenlocal --help` and the commands that do not load a model skip it
    if name == "load_model":
        from qwenlocal.weights.loader import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
