"""Tokenizers: bytes (debug model), Llama 3's tiktoken BPE, and the GPT-2-style byte-level BPE stored in GGUF files.

All three share `encode(text, bos=False, eos=False)`, `decode(ids)`, `bos_id`, `eos_id`, `stop_ids`, `vocab_size`
and `apply_chat_template(messages, add_generation_prompt=True) -> list[int]`.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

import regex

# Llama 3's pre-tokenizer (tiktoken "cl100k"-like: case-insensitive contractions, numbers in groups of <= 3)
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# GPT-2's pre-tokenizer, which Hugging Face's ByteLevel pre-tokenizer also uses
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# `tokenizer.ggml.pre` values for which llama.cpp first isolates every digit, then applies GPT-2's split
# (SmolLM2's original tokenizer.json: Digits(individual_digits) then ByteLevel)
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages
    ):
        raise ValueError(f"messages must be a list of dicts with 'role' and 'content', got {messages!r}")


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, plus bos 256 and eos 257: the tokenizer of the debug config."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258
    add_bos = True  # plain prompts start with bos

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode text as its UTF-8 bytes.

        Args:
            text: the string.
            bos: prepend `bos_id`.
            eos: append `eos_id`.

        Returns:
            Token ids.
        """
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Decode ids to text; bos/eos are dropped and invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """A plain-text chat format: bos, then "role: content\\n" per message, then "assistant: " if asked.

        Args:
            messages: [{"role": ..., "content": ...}, ...].
            add_generation_prompt: end with an open assistant turn.

        Returns:
            Token ids.

        Raises:
            ValueError: malformed messages.
        """
        _check_messages(messages)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant: " if add_generation_prompt else ""), bos=True)


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one "base64(token) rank" per line.

    Args:
        path: the file (Llama 3's `tokenizer.model`).

    Returns:
        token bytes → rank.

    Raises:
        ValueError: a line that is not "base64 int".
    """
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines()):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n + 1}: not a tiktoken BPE line: {line[:80]!r}") from e
    return ranks


class Llama3Tokenizer:
    """Llama 3's tokenizer: tiktoken BPE over 128000 ranks plus 256 special tokens, named as Meta names them.

    Args:
        path: the tiktoken `tokenizer.model`; default: `hub.llama3_tokenizer_path()` (installed, cached or fetched).
    """

    N_SPECIAL = 256
    MAX_ENCODE_CHARS = 400_000  # tiktoken slows down (and can overflow its stack) beyond these
    MAX_RUN_CHARS = 25_000  # longest run of only-whitespace or only-non-whitespace characters encoded at once

    def __init__(self, path: str | Path | None = None):
        import tiktoken

        if path is None:
            from .hub import llama3_tokenizer_path

            path = llama3_tokenizer_path()
        ranks = load_tiktoken_ranks(path)
        names = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>",
            "<|step_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
            "<|image|>",
        ]
        names += [f"<|reserved_special_token_{2 + i}|>" for i in range(self.N_SPECIAL - len(names))]
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(
            name=Path(path).name, pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = len(ranks) + self.N_SPECIAL
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.add_bos = True  # plain prompts start with <|begin_of_text|>

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id, self.eom_id, self.eot_id]

    def _pieces(self, text: str):
        """Cut text so that no piece is too long for tiktoken, only at whitespace/non-whitespace boundaries."""
        for start in range(0, len(text), self.MAX_ENCODE_CHARS):
            chunk = text[start : start + self.MAX_ENCODE_CHARS]
            begin, run, prev = 0, 0, None
            for i, ch in enumerate(chunk):
                space = ch.isspace()
                run = run + 1 if space == prev else 1
                prev = space
                if run > self.MAX_RUN_CHARS:
                    yield chunk[begin:i]
                    begin, run = i, 1
            yield chunk[begin:]

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Encode text; special-token names in it are plain text unless `allow_special`.

        Args:
            text: the string.
            bos: prepend <|begin_of_text|>.
            eos: append <|end_of_text|>.
            allow_special: encode "<|eot_id|>" etc. in the text as their special ids.

        Returns:
            Token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        allowed = "all" if allow_special else set()
        ids = [self.bos_id] * bos
        for piece in self._pieces(text):
            ids += self._enc.encode(piece, allowed_special=allowed, disallowed_special=())
        return ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Decode ids to text (special tokens rendered by name; invalid UTF-8 becomes U+FFFD)."""
        return self._enc.decode(list(ids), errors="replace")

    def _header(self, role: str) -> list[int]:
        return (
            [self.special_tokens["<|start_header_id|>"]]
            + self.encode(role)
            + [self.special_tokens["<|end_header_id|>"]]
            + self.encode("\n\n")
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Llama 3's chat format: <|begin_of_text|>, then per message
        <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>, then an open assistant header if asked.

        Args:
            messages: [{"role": ..., "content": ...}, ...].
            add_generation_prompt: end with the assistant header, for the model to answer.

        Returns:
            Token ids.

        Raises:
            ValueError: malformed messages.
        """
        _check_messages(messages)
        ids = [self.bos_id]
        for m in messages:
            ids += self._header(m["role"]) + self.encode(m["content"].strip()) + [self.eot_id]
        return ids + (self._header("assistant") if add_generation_prompt else [])


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (spaces become "Ġ", newlines "Ċ" ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class GGUFTokenizer:
    """GPT-2-style byte-level BPE built from a GGUF file's `tokenizer.ggml.*` metadata (SmolLM2's tokenizer).

    Args:
        tokens: the vocabulary, as GGUF stores it (byte-level strings, "Ġthe").
        merges: "left right" pairs, highest priority first.
        token_types: per token, 1 normal, 3 control (special), 4 user-defined (matched whole in text) ...
        bos_id: the beginning-of-sequence id.
        eos_id: the end-of-sequence id.
        pre: `tokenizer.ggml.pre` (pre-tokenizer name); digit-isolating names split every digit first.
        chat_template: a Jinja chat template (from `tokenizer.chat_template`); None: ChatML.
        add_bos: whether prompts start with bos (`tokenizer.ggml.add_bos_token`; SmolLM2: no); the chat template
            honours it, and callers encoding plain prompts should pass `bos=tokenizer.add_bos`.

    Raises:
        ValueError: inconsistent metadata (lengths, ids out of range, merges naming unknown tokens).
    """

    def __init__(
        self,
        tokens: list[str],
        merges: list[str],
        token_types: list[int] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pre: str | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        token_types = list(token_types) if token_types is not None else [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ValueError(f"token_types has {len(token_types)} entries for {len(tokens)} tokens")
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None and not 0 <= value < len(tokens):
                raise ValueError(f"{name}={value} is outside the vocabulary of {len(tokens)} tokens")
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {}
        for rank, merge in enumerate(merges):
            pair = tuple(merge.split(" "))
            if len(pair) != 2 or (pair[0] + pair[1]) not in self.ids:
                raise ValueError(f"merge {rank} {merge!r} does not name two tokens whose join is in the vocabulary")
            self.ranks[pair] = rank
        self.vocab_size = len(self.tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pre = pre
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.add_bos = add_bos
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._split = regex.compile(GPT2_SPLIT)
        self._digits = pre in DIGIT_SPLIT_PRE
        # control (3) and user-defined (4) tokens are matched whole before pre-tokenization
        self.special = {t: i for i, (t, kind) in enumerate(zip(self.tokens, token_types)) if kind in (3, 4)}
        self._special_ids = set(self.special.values())
        by_length = sorted(self.special, key=len, reverse=True)
        self._special_split = regex.compile("(" + "|".join(map(regex.escape, by_length)) + ")") if by_length else None
        self._cache: dict[str, list[int]] = {}
        ends = ["<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
        stops = {eos_id} if eos_id is not None else set()
        self.stop_ids = sorted(stops | {self.special[t] for t in ends if t in self.special})

    @classmethod
    def from_gguf(cls, path_or_reader) -> GGUFTokenizer:
        """Build the tokenizer from a GGUF file (a path or an open `gguf.GGUFReader`).

        Raises:
            ValueError: the file holds no GPT-2-style tokenizer.
        """
        import gguf

        reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(path_or_reader)

        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        model = field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"GGUF tokenizer.ggml.model is {model!r}; GGUFTokenizer reads only 'gpt2' (byte-level BPE)"
            )
        return cls(
            tokens=field("tokenizer.ggml.tokens"),
            merges=field("tokenizer.ggml.merges", []),
            token_types=field("tokenizer.ggml.token_type"),
            bos_id=field("tokenizer.ggml.bos_token_id"),
            eos_id=field("tokenizer.ggml.eos_token_id"),
            pre=field("tokenizer.ggml.pre"),
            chat_template=field("tokenizer.chat_template"),
            add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
        )

    def _bpe(self, piece: str) -> list[int]:
        """Merge one pre-token (already in the byte alphabet) by lowest merge rank until no merge applies."""
        if piece in self._cache:
            return self._cache[piece]
        word = list(piece)
        while len(word) > 1:
            left, right = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if (left, right) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the pair, left to right
                if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.ids[w] for w in word]  # single byte characters are always in a byte-level vocabulary
        self._cache[piece] = ids
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        chunks = regex.split(r"(\p{N})", text) if self._digits else [text]
        ids = []
        for chunk in chunks:
            for piece in self._split.findall(chunk):
                ids += self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8")))
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = True) -> list[int]:
        """Encode text with the byte-level BPE.

        Args:
            text: the string.
            bos: prepend `bos_id`.
            eos: append `eos_id`.
            allow_special: match control tokens ("<|im_start|>") in the text whole, as Hugging Face does.

        Returns:
            Token ids.

        Raises:
            TypeError: text is not a str.
            ValueError: bos/eos asked but the file defines none.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if (bos and self.bos_id is None) or (eos and self.eos_id is None):
            raise ValueError("bos/eos asked for but this GGUF tokenizer defines no bos_token_id/eos_token_id")
        parts = self._special_split.split(text) if allow_special and self._special_split else [text]
        ids = [self.bos_id] * bos
        for i, part in enumerate(parts):  # split with a capture group: odd parts are the special tokens
            ids += [self.special[part]] if i % 2 else self._encode_ordinary(part)
        return ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Decode ids to text (control tokens rendered as their text; invalid UTF-8 becomes U+FFFD).

        Raises:
            ValueError: an id outside the vocabulary.
        """
        out = bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
            for ch in self.tokens[i]:
                b = self.byte_decoder.get(ch)
                out += bytes([b]) if b is not None and i not in self._special_ids else ch.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render the file's Jinja chat template (SmolLM2: ChatML with a default system turn) and encode it.

        Args:
            messages: [{"role": ..., "content": ...}, ...].
            add_generation_prompt: end with an open assistant turn ("<|im_start|>assistant\\n").

        Returns:
            Token ids.

        Raises:
            ValueError: malformed messages.
        """
        _check_messages(messages)
        text = _render_template(
            self.chat_template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.tokens[self.bos_id] if self.bos_id is not None else "",
            eos_token=self.tokens[self.eos_id] if self.eos_id is not None else "",
        )
        return self.encode(text, bos=self.add_bos and self.bos_id is not None)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _render_template(template: str, **context) -> str:
    return _compile_template(template).render(**context)
