"""Kimi's tokenizer: the tiktoken-format byte-level BPE of a checkpoint, run by the `tokenizers` library.

A checkpoint directory holds
    tiktoken.model          one "base64(token bytes) rank" line per token; the rank is the token id
    tokenizer_config.json   added_tokens_decoder (special tokens, ids after the base vocabulary),
                            bos_token / eos_token, optionally chat_template
    chat_template.jinja     optional; wins over tokenizer_config.json's chat_template

Kimi's own tokenizer (tokenization_kimi.py) hands these to tiktoken; we rebuild the same encoding
for `tokenizers` (Rust, no tiktoken dependency): a BPE whose merges come from the ranks, Kimi's split
regex verbatim, and every special token (named or reserved) recognized wherever it stands in the
text, as Kimi's encode(allow_special_tokens=True) does. tests/test_tokenizer.py checks the result
against tiktoken id for id.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
from pathlib import Path

import tokenizers

from .template import render_chat_template
from ..errors import CheckpointError

VOCAB_FILE, CONFIG_FILE, TEMPLATE_FILE = "tiktoken.model", "tokenizer_config.json", "chat_template.jinja"

# Kimi's pre-tokenization pattern, verbatim from tokenization_kimi.py. `&&` is class intersection:
# Rust's fancy-regex (tiktoken), Oniguruma (`tokenizers`) and `regex` in V1 mode all read it the
# same way (tests/test_tokenizer.py compares the splits), so no rewrite is needed.
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Kimi reserves this many ids after the base vocabulary for special tokens; the ones
# added_tokens_decoder leaves unnamed are called <|reserved_token_{id}|>.
NUM_RESERVED_SPECIAL_TOKENS = 256

# Kimi K2 Thinking's named special tokens by offset from the base vocabulary (163584 + offset there).
KIMI_SPECIAL_TOKENS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
                       6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
                       11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>",
                       13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>",
                       17: "<|im_middle|>", 22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet `tokenizers`' ByteLevel works in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def read_tiktoken_model(path: Path) -> list[bytes]:
    """The base vocabulary of a tiktoken.model file: token bytes, indexed by rank (= id)."""
    by_rank: dict[int, bytes] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64-bytes rank'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise CheckpointError(f"{path}: line {number}: {e}") from None
        if rank in by_rank:
            raise CheckpointError(f"{path}: line {number}: rank {rank} appears twice")
        by_rank[rank] = token
    tokens = [by_rank.get(rank) for rank in range(len(by_rank))]
    if None in tokens:
        raise CheckpointError(f"{path}: ranks must be 0..{len(by_rank) - 1} without gaps "
                              f"(rank {tokens.index(None)} is missing)")
    distinct = set(tokens)
    if len(distinct) != len(tokens):
        raise CheckpointError(f"{path}: the same token bytes appear under two ranks")
    missing = [b for b in range(256) if bytes([b]) not in distinct]
    if missing:
        raise CheckpointError(f"{path}: byte-level BPE needs all 256 single bytes; byte {missing[0]} is missing")
    return tokens


def read_special_tokens(config: dict, path: Path, num_base: int) -> dict[int, str]:
    """Special token id -> string from tokenizer_config.json, reserved names filling the gaps.

    Covers ids num_base .. num_base+255 (Kimi's reserved block) and any named id beyond it.
    """
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{path}: added_tokens_decoder must be an object of id -> token")
    named: dict[int, str] = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else entry
        if not (isinstance(key, str) and key.isdigit() and isinstance(content, str) and content):
            raise CheckpointError(f"{path}: added_tokens_decoder entry {key!r} needs an integer id and a "
                                  "'content' string")
        if int(key) < num_base:
            raise CheckpointError(f"{path}: added token {content!r} has id {key}, inside the base vocabulary "
                                  f"(0..{num_base - 1}) of {VOCAB_FILE}")
        named[int(key)] = content
    end = max([num_base + NUM_RESERVED_SPECIAL_TOKENS - 1, *named]) + 1
    specials = {i: named.get(i, f"<|reserved_token_{i}|>") for i in range(num_base, end)}
    if len(set(specials.values())) != len(specials):
        raise CheckpointError(f"{path}: added_tokens_decoder names the same token twice")
    return specials


def bpe_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's ranks: every split of a token into two tokens, by the token's rank.

    tiktoken merges any adjacent pair whose concatenation is a token, lowest rank first, so each way
    of writing a token as two tokens is a merge with that token's priority; keeping only the split
    BPE training made would miss the rarer pairs that tiktoken also merges.
    """
    vocab = set(tokens)
    return [(t[:i], t[i:]) for t in tokens for i in range(1, len(t)) if t[:i] in vocab and t[i:] in vocab]


def build_backend(tokens: list[bytes], specials: dict[int, str]) -> tokenizers.Tokenizer:
    """A `tokenizers` Tokenizer for a tiktoken vocabulary (ids 0..n-1) and special tokens (ids n.. contiguous)."""
    alphabet = bytes_to_unicode()
    text = lambda t: "".join(alphabet[b] for b in t)  # noqa: E731 - token bytes -> ByteLevel string
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        # `tokenizers` gives added tokens consecutive ids after the model's vocabulary, in list order, so
        # listing them by id (specials are contiguous from len(tokens)) lands each on its own id; checked below.
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in sorted(specials.items())],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": KIMI_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "decoder": byte_level,
        # ignore_merges: a piece that is a whole token becomes that token, as in tiktoken.
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(t): i for i, t in enumerate(tokens)},
                  "merges": [[text(a), text(b)] for a, b in bpe_merges(tokens)]},
    }
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    for i, s in specials.items():
        if backend.token_to_id(s) != i:
            raise ValueError(f"special token {s!r} must have id {i} but got {backend.token_to_id(s)}: a base token "
                             "has the same text, or special ids are not contiguous after the base vocabulary")
    return backend


def _token_name(config: dict, key: str, path: Path) -> str | None:
    value = config.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{path}: {key} must be a string or {{'content': string}}")
    return value


def _chat_template(directory: Path, config: dict, path: Path) -> str | None:
    """The directory's chat template: chat_template.jinja, else tokenizer_config.json's chat_template."""
    if (directory / TEMPLATE_FILE).is_file():
        try:
            return (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{directory / TEMPLATE_FILE}: cannot read ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # HF's named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{path}: chat_template must be a string or a list holding a 'default' template")
    return template


class Tokenizer:
    """Text <-> token ids for Kimi checkpoints, plus the chat template.

    tokens: base vocabulary bytes by id (0..n-1); special_tokens: id -> string, ids n, n+1, ...
    Every special string inside input text encodes to its id (Kimi's default). Decoding a base token
    sequence that cuts a UTF-8 character yields U+FFFD; stream with `incremental_decoder()` instead.
    """

    def __init__(self, tokens: list[bytes], special_tokens: dict[int, str], *, bos_token: str | None = None,
                 eos_token: str | None = None, chat_template: str | None = None):
        self.backend = build_backend(tokens, special_tokens)   # the `tokenizers.Tokenizer` (can save tokenizer.json)
        self.special_tokens = {s: i for i, s in special_tokens.items()}     # string -> id
        self.vocab_size = len(tokens) + len(special_tokens)
        # Bytes of every id, for the incremental decoder.
        self.token_bytes = tokens + [special_tokens[i].encode() for i in sorted(special_tokens)]
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and token not in self.special_tokens:
                raise ValueError(f"{name} {token!r} is not a special token")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template   # None: the built-in Kimi K2 Thinking template (chat.py)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        """Read tiktoken.model, tokenizer_config.json and the chat template of a checkpoint directory.

        bos/eos come from tokenizer_config.json (Kimi's class defaults: [BOS], [EOS]).
        Raises CheckpointError naming the file for anything missing or malformed.
        """
        directory = Path(directory)
        vocab_path, config_path = directory / VOCAB_FILE, directory / CONFIG_FILE
        for path in (vocab_path, config_path):
            if not path.is_file():
                raise CheckpointError(f"{path}: file is missing")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object")
        tokens = read_tiktoken_model(vocab_path)
        specials = read_special_tokens(config, config_path, len(tokens))
        names = set(specials.values())
        bos = _token_name(config, "bos_token", config_path) or ("[BOS]" if "[BOS]" in names else None)
        eos = _token_name(config, "eos_token", config_path) or ("[EOS]" if "[EOS]" in names else None)
        template = _chat_template(directory, config, config_path)
        try:
            return cls(tokens, specials, bos_token=bos, eos_token=eos, chat_template=template)
        except ValueError as e:   # bos/eos not special, or a special token that cannot sit at its id
            raise CheckpointError(f"{config_path}: {e}") from None

    # ids and strings
    @property
    def bos_token_id(self) -> int | None:
        return self.special_tokens.get(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.special_tokens.get(self.eos_token)

    def token_to_id(self, token: str) -> int | None:
        """Id of a special string or of a base token in ByteLevel form (e.g. 'Ġthe'); None if unknown."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Inverse of token_to_id; None for an id outside the vocabulary."""
        return self.backend.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special token strings in it become their ids. No BOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of one id or a sequence of ids (invalid UTF-8 becomes U+FFFD).

        Raises ValueError for an id outside the vocabulary (`tokenizers` would skip it silently).
        """
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        """A fresh streaming decoder (one per generated sequence)."""
        return IncrementalDecoder(self, skip_special_tokens)

    # chat
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True, **kwargs):
        """Render OpenAI-format messages (and tool schemas) with the checkpoint's chat template, HF-style.

        Returns the token ids, or the string when tokenize=False. Extra kwargs reach the template
        (after bos_token / eos_token, which they may override).
        """
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None}
        text = render_chat_template(messages, tools, chat_template=self.chat_template,
                                    add_generation_prompt=add_generation_prompt, **{**special, **kwargs})
        return self.encode(text) if tokenize else text


class IncrementalDecoder:
    """Token ids in, text out, for streaming: never emits part of a UTF-8 character.

    Bytes of a character split across tokens are held until the character is complete; flush()
    returns what is left (an incomplete character becomes U+FFFD, as in Tokenizer.decode).
    The concatenated output equals tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._bytes, self._num_base = tokenizer.token_bytes, tokenizer.vocab_size - len(tokenizer.special_tokens)
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids) -> str:
        """Feed one id or a list of ids; returns the newly complete text (possibly '')."""
        ids = [ids] if isinstance(ids, int) else ids
        out = []
        for i in ids:
            if not 0 <= i < len(self._bytes):
                raise ValueError(f"token id {i} outside the vocabulary [0, {len(self._bytes)})")
            if i >= self._num_base:
                if not self._skip:   # a special token ends any pending character (as in decode())
                    out += [self._utf8.decode(b"", final=True), self._bytes[i].decode()]
            else:
                out.append(self._utf8.decode(self._bytes[i]))
        return "".join(out)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def train_bpe(texts, vocab_size: int) -> list[bytes]:
    """Token bytes by rank (= id) of a byte-level BPE trained with `tokenizers` on `texts` (an iterable
    of strings, no merge spans two of them), split as Kimi splits text: a vocabulary for write_kimi_tokenizer."""
    from tokenizers import Regex, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(KIMI_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    by_id = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    return [bytes(to_byte[c] for c in token) for token, _ in by_id]


def write_kimi_tokenizer(directory: str | Path, tokens: list[bytes], special_tokens: dict[int, str] | None = None,
                         *, bos_token: str = "[BOS]", eos_token: str = "<|im_end|>", chat_template: str | None = None,
                         model_max_length: int = 262144) -> Path:
    """Write a byte-level BPE vocabulary as Kimi's checkpoints hold it; returns the directory.

    tokens: token bytes by rank (= id), all 256 single bytes among them. special_tokens: offset from
    the base vocabulary -> string (default KIMI_SPECIAL_TOKENS); the rest of the reserved block stays
    unnamed. Writes tiktoken.model ("base64(bytes) rank" lines), tokenizer_config.json
    (added_tokens_decoder, bos/eos, and pad/unk when [PAD]/[UNK] are among the specials) and, when
    given, chat_template.jinja.
    """
    directory = Path(directory)
    specials = KIMI_SPECIAL_TOKENS if special_tokens is None else special_tokens
    names = set(specials.values())
    for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
        if token not in names:
            raise ValueError(f"{name} {token!r} is not among the special tokens")
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (directory / VOCAB_FILE).write_text("\n".join(lines) + "\n")
    n = len(tokens)
    config = {
        "added_tokens_decoder": {str(n + k): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                 for k, s in sorted(specials.items())},
        "bos_token": bos_token, "eos_token": eos_token,
        **({"pad_token": "[PAD]"} if "[PAD]" in names else {}), **({"unk_token": "[UNK]"} if "[UNK]" in names else {}),
        "tokenizer_class": "TikTokenTokenizer", "model_max_length": model_max_length,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if chat_template is not None:
        (directory / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    return directory


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The checkpoint's Tokenizer, or None when the directory has no tiktoken.model."""
    if not (Path(directory) / VOCAB_FILE).is_file():
        return None
    return Tokenizer.from_pretrained(directory)
