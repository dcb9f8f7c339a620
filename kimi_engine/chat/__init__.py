"""Kimi's chat format: the tokenizer, the chat template, and parsing what the model writes."""

from .parser import THINK_BEGIN, THINK_END, StreamParser, parse_assistant
from .template import builtin_chat_template, render_chat_template
from .tokenizer import Tokenizer, load_tokenizer
from .validate import check_messages, check_tools

__all__ = ["THINK_BEGIN", "THINK_END", "StreamParser", "Tokenizer", "builtin_chat_template", "check_messages",
           "check_tools", "load_tokenizer", "parse_assistant", "render_chat_template"]
