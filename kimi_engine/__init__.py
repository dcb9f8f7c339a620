"""kimi-engine: run Kimi K2 Thinking (and any DeepSeek-V3-architecture checkpoint) from Python.

    import kimi_engine as ke
    engine = ke.load("/path/to/Kimi-K2-Thinking")
    engine.logits(token_ids)          # float32 [len, vocab]
"""

from .checkpoint import load_model, read_headers, save_checkpoint
from .config import ModelConfig, QuantConfig
from .runtime.engine import Engine, load
from .runtime.request import Completion, Delta, Request
from .runtime.sampling import SamplingParams
from .chat.parser import StreamParser, parse_assistant
from .errors import CheckpointError
from .chat.tokenizer import Tokenizer

__all__ = ["CheckpointError", "Completion", "Delta", "Engine", "ModelConfig", "QuantConfig", "Request", "SamplingParams",
           "StreamParser", "Tokenizer", "load", "load_model", "parse_assistant", "read_headers", "save_checkpoint"]
__version__ = "0.1.0"
