"""qwenlocal: Qwen3-30B-A3B (and the Qwen3 MoE family) on one GPU."""

from .config import Qwen3MoeConfig
from .errors import UserError
from .loader import load_model

__all__ = ["Qwen3MoeConfig", "UserError", "load_model"]
__version__ = "0.1.0"
