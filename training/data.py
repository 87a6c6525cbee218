"""Corpus → documents → tokens → packed rows with document ids → batches with the document mask.

Documents are tokenized as [bos] + text + [eos], concatenated, and cut into rows of seq_len + 1 tokens (inputs
are the first seq_len, targets the last seq_len). A row can hold several documents or a piece of one; the
document ids give `cu_seqlens` over the flattened batch so attention never crosses a document or a row, and a
target that belongs to the next document (eos → bos) is ignored.

Positions count from 0 at the start of each attention segment (a document, or the piece of one a row holds).
RoPE makes attention depend only on position differences, so inside a segment any offset gives the same
logits in exact arithmetic; starting at 0 keeps rotation angles small (least rounding at θ = 500000) and
matches what generation sees (a prompt starts at position 0).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

IGNORE = -100  # cross_entropy's ignore_index
# stdlib folders that are not the library itself (third-party packages, test suites, demos)
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


@dataclass
class Document:
    name: str
    text: str


def stdlib_files(max_bytes: int) -> list[Path]:
    """The embedded corpus: this Python's standard library `.py` files, sorted by path, the first `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not STDLIB_SKIP & set(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    chosen, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def _read_text(path: Path) -> str | None:
    """A file's text, or None for a binary file (a NUL byte in the first 8 KiB, or not UTF-8)."""
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data: {path}:{lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"data: {path}:{lineno} must be an object with a string field 'text'")
        docs.append(Document(f"{path}:{lineno}", record["text"]))
    return docs


def load_documents(data: str | None, max_bytes: int = 2_000_000) -> list[Document]:
    """Read a corpus into documents, in a deterministic order.

    Args:
        data: None (the embedded standard-library corpus), a text file (one document), a JSONL file
            (one document per {"text": ...} line) or a folder (every text or JSONL file in it, sorted by path;
            binary files are skipped).
        max_bytes: cap on the embedded corpus.
    Returns:
        The non-empty documents.
    Raises:
        FileNotFoundError: `data` does not exist.
        ValueError: a malformed JSONL line, or no text at all.
    """
    if data is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = [
            Document(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in stdlib_files(max_bytes)
        ]
        where = f"the standard library at {root}"
    else:
        path = Path(data)
        where = str(path)
        if not path.exists():
            raise FileNotFoundError(f"data: no such file or folder: {path}")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        docs = []
        for f in files:
            if f.suffix == ".jsonl":
                docs.extend(_read_jsonl(f))
            elif (text := _read_text(f)) is not None:
                docs.append(Document(f.relative_to(path).as_posix() if path.is_dir() else f.name, text))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"data: no text found in {where}")
    return docs


def split_documents(docs: list[Document], eval_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out every round(1 / eval_fraction)-th document; with fewer documents than that, the last document
    gives up the tail `eval_fraction` of its text instead.

    Returns:
        (train, held_out), both non-empty.
    """
    every = max(2, round(1 / eval_fraction))
    if len(docs) < every:
        last = docs[-1]
        cut = int(len(last.text) * (1 - eval_fraction))
        return docs[:-1] + [Document(last.name, last.text[:cut])], [Document(last.name + "#heldout", last.text[cut:])]
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    return [d for i, d in enumerate(docs) if i % every != every - 1], held


def get_tokenizer(path: str | None):
    """The Llama 3 tokenizer from a tiktoken model file, or the byte tokenizer (vocab 258) when `path` is None."""
    from llama3_kernels.model.tokenizer import ByteTokenizer, Llama3Tokenizer

    return ByteTokenizer() if path is None else Llama3Tokenizer(path)


@dataclass
class Packed:
    """Rows of seq_len + 1 tokens and the document id of every token."""

    tokens: Tensor  # [N, seq_len + 1] int32
    doc_ids: Tensor  # [N, seq_len + 1] int32

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pack(docs: list[Document], tokenizer, seq_len: int) -> Packed:
    """Tokenize documents as [bos] text [eos], concatenate, and cut into rows of seq_len + 1 (the tail is dropped).

    Raises:
        ValueError: the documents hold fewer than seq_len + 1 tokens.
    """
    ids, doc = [], []
    for i, d in enumerate(docs):
        toks = tokenizer.encode(d.text, bos=True, eos=True)
        ids.extend(toks)
        doc.extend([i] * len(toks))
    width = seq_len + 1
    n = len(ids) // width
    if n == 0:
        raise ValueError(f"data: {len(ids)} tokens cannot fill one row of seq_len + 1 = {width} tokens")
    tokens = torch.tensor(ids[: n * width], dtype=torch.int32).view(n, width)
    doc_ids = torch.tensor(doc[: n * width], dtype=torch.int32).view(n, width)
    return Packed(tokens, doc_ids)


@dataclass
class Corpus:
    train: Packed
    held_out: Packed
    fingerprint: str  # sha256 of the packed train and held-out tokens: same data, same fingerprint
    n_docs: tuple[int, int]


def build_corpus(data: str | None, seq_len: int, eval_fraction: float, max_bytes: int, tokenizer) -> Corpus:
    """Load, split, tokenize and pack a corpus (see load_documents and split_documents for the arguments)."""
    train_docs, held_docs = split_documents(load_documents(data, max_bytes), eval_fraction)
    train = pack(train_docs, tokenizer, seq_len)
    try:
        held = pack(held_docs, tokenizer, seq_len)
    except ValueError:  # a short held-out split still evaluates: one row, padded with ignored targets
        ids = [t for d in held_docs for t in tokenizer.encode(d.text, bos=True, eos=True)][: seq_len + 1]
        tokens = torch.full((1, seq_len + 1), IGNORE, dtype=torch.int32)
        tokens[0, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        doc_ids = torch.zeros(1, seq_len + 1, dtype=torch.int32)
        doc_ids[0, len(ids) :] = 1
        held = Packed(tokens, doc_ids)
    h = hashlib.sha256()
    for t in (train.tokens, held.tokens):
        h.update(t.numpy().tobytes())
    return Corpus(train, held, h.hexdigest(), (len(train_docs), len(held_docs)))


@dataclass
class Batch:
    """One micro-batch on one rank, flattened document mask included."""

    tokens: Tensor  # [B, S] int64
    targets: Tensor  # [B, S] int64, IGNORE where the next token starts another document
    positions: Tensor  # [B, S] int64, index inside the attention segment
    cu_seqlens: Tensor  # [segments + 1] int32 offsets over the flattened B * S tokens
    max_seqlen: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.tokens.to(device), self.targets.to(device), self.positions.to(device),
            self.cu_seqlens.to(device), self.max_seqlen,
        )  # fmt: skip


def make_batch(rows: Packed, index: Tensor) -> Batch:
    """Inputs, targets, positions and cu_seqlens for the rows `index` of `rows`."""
    tok, doc = rows.tokens[index].long(), rows.doc_ids[index]
    inputs, targets = tok[:, :-1], tok[:, 1:].clone()
    targets[doc[:, 1:] != doc[:, :-1]] = IGNORE
    targets[tok[:, 1:] < 0] = IGNORE  # padding of a short held-out row
    b, s = inputs.shape
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:-1] != doc[:, :-2]  # a new segment at each row start and document change
    flat = starts.flatten()
    offsets = flat.nonzero().flatten()  # [segments]
    seg = flat.long().cumsum(0) - 1  # segment of every token
    positions = (torch.arange(b * s) - offsets[seg]).view(b, s)
    cu = torch.cat([offsets, torch.tensor([b * s])]).to(torch.int32)
    return Batch(inputs.clamp_min(0), targets, positions, cu, int((cu[1:] - cu[:-1]).max()))


class Loader:
    """Deterministic shuffled order over the packed rows, addressed by a global row counter (the data position).

    Row k of the stream is epoch k // N's permutation (seeded by seed and epoch) at k % N, so a run restarted
    at position k sees exactly the rows an uninterrupted run would.
    """

    def __init__(self, rows: Packed, seed: int):
        self.rows, self.seed = rows, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.rows), generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> Tensor:
        """Row indices of stream positions [start, start + count)."""
        n = len(self.rows)
        return torch.stack([self._permutation(k // n)[k % n] for k in range(start, start + count)])

    def valid_targets(self, index: Tensor) -> int:
        """Targets that count in the loss for these rows (the loss divides by this, summed over the step)."""
        tok, doc = self.rows.tokens[index], self.rows.doc_ids[index]
        return int(((doc[:, 1:] == doc[:, :-1]) & (tok[:, 1:] >= 0)).sum())
