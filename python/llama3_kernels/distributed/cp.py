"""Context parallelism as Llama 3 trains long context (paper §3.3.2), on torch.distributed.

The sequence is cut into 2·CP chunks and rank i holds chunks i and 2·CP−1−i, so causal work is balanced.
K and V (small next to Q under GQA) are all-gathered; each rank attends its local queries to the gathered
keys of their documents with one `flash_attention` call per chunk; backward reduce-scatters dK/dV to owners.

Hangs: every `context_parallel_attention` call (unless `validate=False`) first all-gathers a small metadata
tensor, so mismatched inputs raise the same error on every rank before any data collective. A rank that
never arrives is caught only by the process group's timeout: pass `timeout=` to `dist.init_process_group`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from llama3_kernels.ops.attention import flash_attention, flash_attn_bwd

_DTYPE_IDS = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


# --------------------------------------------------------------------------------------- sharding
def chunk_ranges(seq_len: int, cp_size: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Global token ranges [start, end) of the two chunks `rank` holds: chunks rank and 2·cp_size−1−rank.

    Raises:
        ValueError if seq_len is not divisible by 2·cp_size or rank is out of range.
    """
    if cp_size < 1 or not 0 <= rank < cp_size:
        raise ValueError(f"rank: expected 0 <= rank < cp_size ({cp_size}), got {rank}")
    if seq_len % (2 * cp_size):
        raise ValueError(f"seq_len: must be divisible by 2·cp_size = {2 * cp_size}, got {seq_len}")
    c = seq_len // (2 * cp_size)
    j = 2 * cp_size - 1 - rank
    return (rank * c, (rank + 1) * c), (j * c, (j + 1) * c)


def shard_sequence(x: Tensor, cp_size: int, rank: int, dim: int = 0) -> Tensor:
    """This rank's part of a full sequence: chunks rank and 2·cp_size−1−rank of `dim`, concatenated."""
    (a0, a1), (b0, b1) = chunk_ranges(x.shape[dim], cp_size, rank)
    return torch.cat((x.narrow(dim, a0, a1 - a0), x.narrow(dim, b0, b1 - b0)), dim)


def unshard_sequence(shards: Sequence[Tensor], dim: int = 0) -> Tensor:
    """Inverse of `shard_sequence`: every rank's local tensor, in rank order → the full sequence."""
    cp = len(shards)
    if cp == 0 or any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"shards: expected a non-empty list of equal shapes, got {[tuple(s.shape) for s in shards]}")
    if shards[0].shape[dim] % 2:
        raise ValueError(
            f"shards: each shard holds two equal chunks, got odd length {shards[0].shape[dim]} in dim {dim}"
        )
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def gather_sequence(x_local: Tensor, group: dist.ProcessGroup | None = None, dim: int = 0) -> Tensor:
    """All-gather every rank's shard and return the full sequence (not differentiable; for outputs, logits)."""
    cp = _group_size(group)
    if cp == 1:
        return x_local
    parts = [torch.empty_like(x_local) for _ in range(cp)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    return unshard_sequence(parts, dim)


def doc_ids_to_cu_seqlens(doc_ids: Tensor) -> Tensor:
    """Document offsets int32 [N + 1] from per-token document ids [S] (a new document where the id changes)."""
    if doc_ids.dim() != 1:
        raise ValueError(f"doc_ids: expected 1 dim [S], got shape {tuple(doc_ids.shape)}")
    starts = torch.nonzero(doc_ids[1:] != doc_ids[:-1]).flatten() + 1
    s = torch.tensor([doc_ids.shape[0]], device=doc_ids.device)
    edges = [s.new_zeros(1)] if doc_ids.shape[0] else []
    return torch.cat(edges + [starts, s]).to(torch.int32)


@dataclass
class CPBatch:
    """One rank's share of a packed batch: tokens/positions/labels [1, S / cp_size], global cu_seqlens."""

    tokens: Tensor
    positions: Tensor
    labels: Tensor | None
    cu_seqlens: Tensor
    cp_size: int
    rank: int


def shard_batch(
    tokens: Tensor,
    cp_size: int,
    rank: int,
    labels: Tensor | None = None,
    positions: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    doc_ids: Tensor | None = None,
) -> CPBatch:
    """Split one packed sequence into this rank's two load-balanced chunks.

    Args:
        tokens: [S] or [1, S] token ids of the full packed sequence; S divisible by 2·cp_size.
        cp_size, rank: the context-parallel group size and this rank.
        labels: targets aligned with tokens (shift on the full sequence, before sharding), or None.
        positions: RoPE positions [S] / [1, S]; default arange(S). Sharded, so each token keeps its original one.
        cu_seqlens / doc_ids: the document mask, as int32 offsets [N + 1] or per-token ids [S] (not both);
            neither means one document.
    Returns:
        CPBatch with [1, S / cp_size] tokens, positions, labels and the global int32 cu_seqlens (what
        `make_cp_attn_fn` takes).
    Raises:
        ValueError naming the argument.
    """
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(f"tokens: expected [S] or [1, S] (one packed sequence), got shape {tuple(tokens.shape)}")
    s = tokens.shape[0]
    if cu_seqlens is not None and doc_ids is not None:
        raise ValueError("cu_seqlens, doc_ids: give one document mask, not both")
    if doc_ids is not None:
        cu_seqlens = doc_ids_to_cu_seqlens(doc_ids.reshape(-1))
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, s], dtype=torch.int32, device=tokens.device)
    vals = cu_seqlens.tolist()
    if not vals or vals[0] != 0 or vals[-1] != s or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {s}, got {vals[:8]}…")
    if positions is None:
        positions = torch.arange(s, device=tokens.device)
    shard = {}
    for name, t in (("positions", positions), ("labels", labels)):
        if t is not None:
            t = t.reshape(-1)
            if t.shape[0] != s:
                raise ValueError(f"{name}: expected {s} entries like tokens, got shape {tuple(t.shape)}")
            shard[name] = shard_sequence(t, cp_size, rank)[None]
    return CPBatch(
        tokens=shard_sequence(tokens, cp_size, rank)[None], positions=shard["positions"], labels=shard.get("labels"),
        cu_seqlens=cu_seqlens.to(torch.int32), cp_size=cp_size, rank=rank,
    )  # fmt: skip


def cp_attention_flops(cu_seqlens: Tensor | Sequence[int], cp_size: int, n_heads: int, head_dim: int) -> list[int]:
    """Forward attention FLOPs of each rank under the causal document mask (2 matmuls × 2 FLOPs per pair).

    Counts the (query, key) pairs each rank's chunks see: a query at offset t of its document sees t + 1 keys.
    """
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else list(cu_seqlens)
    flops = []
    for rank in range(cp_size):
        pairs = 0
        for c0, c1 in chunk_ranges(cu[-1], cp_size, rank):
            for s, e in zip(cu, cu[1:]):
                lo, hi = max(s, c0), min(e, c1)  # queries of this document in the chunk, offsets lo-s .. hi-s-1
                if hi > lo:
                    pairs += (hi - s) * (hi - s + 1) // 2 - (lo - s) * (lo - s + 1) // 2
        flops.append(4 * pairs * n_heads * head_dim)
    return flops


# -------------------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class _ChunkSegments:
    """One local query chunk: its keys are K[k0:k1] of the gathered sequence, segmented per document."""

    k0: int
    k1: int
    cu_q: Tensor  # int32 [n + 1], query offsets within the chunk
    cu_k: Tensor  # int32 [n + 1], key offsets within K[k0:k1]
    max_q: int
    max_k: int


@dataclass(frozen=True)
class CPLayout:
    """Host-side plan of one rank's attention: chunk size and the document segments of its two chunks."""

    cp_size: int
    rank: int
    chunk: int
    segments: tuple[_ChunkSegments, _ChunkSegments]


def cp_layout(
    cu_seqlens: Tensor | Sequence[int], cp_size: int, rank: int, device: torch.device | str = "cpu"
) -> CPLayout:
    """Per-chunk query/key segments for `rank` (checked global offsets; one host sync if a tensor)."""
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else list(cu_seqlens)
    segments = []
    for c0, c1 in chunk_ranges(cu[-1], cp_size, rank):
        # The chunk's documents d1..dn: queries [c0,e1), [e1,e2), …, [s_n,c1) and keys [s1,e1), [e1,e2), …,
        # [s_n,c1): consecutive in the gathered K, so one varlen call with bottom-right causal alignment.
        k0, cu_q, cu_k = None, [0], [0]
        for s, e in zip(cu, cu[1:]):
            if e <= c0 or s >= c1 or s == e:
                continue
            k0 = s if k0 is None else k0
            cu_q.append(min(e, c1) - c0)
            cu_k.append(min(e, c1) - k0)
        as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        segments.append(
            _ChunkSegments(
                k0=k0,
                k1=c1,
                cu_q=as_t(cu_q),
                cu_k=as_t(cu_k),
                max_q=max(b - a for a, b in zip(cu_q, cu_q[1:])),
                max_k=max(b - a for a, b in zip(cu_k, cu_k[1:])),
            )
        )
    return CPLayout(cp_size=cp_size, rank=rank, chunk=cu[-1] // (2 * cp_size), segments=tuple(segments))


# ----------------------------------------------------------------------------------- collectives
def _group_size(group: dist.ProcessGroup | None) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_gather_into(out: Tensor, x: Tensor, group, async_op: bool):
    """All-gather x [n, ...] into a contiguous out [cp, n, ...] (passed flat: gloo wants [cp·n, ...])."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    return fn(out.view((-1,) + x.shape[1:]) if x.dim() else out, x, group=group, async_op=async_op)


_NO_REDUCE_SCATTER: set[str] = set()  # backends found lacking reduce_scatter (a cache, safe to drop)


def _reduce_scatter(inp: Tensor, group, async_op: bool, force_all_to_all: bool = False):
    """Sum `inp` [cp·n, ...] over ranks and keep this rank's [n, ...] slice. Returns (result_fn, work).

    Backends without reduce_scatter (gloo in older torch releases) use all_to_all + a local sum: the same bytes on
    the wire, CP× the receive buffer. The decision is per backend, so every rank takes the same path.
    """
    cp = _group_size(group)
    backend = str(dist.get_backend(group))
    if not force_all_to_all and backend not in _NO_REDUCE_SCATTER:
        out = inp.new_empty((inp.shape[0] // cp,) + inp.shape[1:])
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        try:
            return (lambda: out), fn(out, inp, group=group, async_op=async_op)
        except (RuntimeError, NotImplementedError) as err:
            if "support" not in str(err).lower():
                raise
            _NO_REDUCE_SCATTER.add(backend)
    recv = torch.empty_like(inp)
    work = dist.all_to_all_single(recv, inp, group=group, async_op=async_op)
    return (lambda: recv.view((cp, -1) + inp.shape[1:]).sum(0)), work


def _to_global(gathered: Tensor) -> Tensor:
    """[cp, 2c, ...] (rank r: chunks r, 2cp−1−r) → [2cp·c, ...] in sequence order."""
    cp, two_c = gathered.shape[:2]
    g = gathered.view((cp, 2, two_c // 2) + gathered.shape[2:])
    return torch.cat((g[:, 0], g[:, 1].flip(0))).flatten(0, 1)


def _to_rank_major(full: Tensor, cp: int) -> Tensor:
    """Inverse of `_to_global`: [2cp·c, ...] → [cp·2c, ...] with rank r's two chunks at r·2c."""
    f = full.view((2 * cp, -1) + full.shape[1:])
    return torch.stack((f[:cp], f[cp:].flip(0)), 1).flatten(0, 2)


def _gather_kv(k: Tensor, v: Tensor, heads: tuple[int, int], group, cp: int):
    """Start async all-gathers of K/V heads [h0, h1); returns (k_buf, v_buf, works)."""
    h0, h1 = heads
    bufs, works = [], []
    for x in (k, v):
        part = x[:, h0:h1].contiguous()
        buf = part.new_empty((cp,) + part.shape)
        works.append(_all_gather_into(buf, part, group, async_op=True))
        bufs.append(buf)
    return bufs[0], bufs[1], works


def _head_steps(hkv: int, step: int | None) -> list[tuple[int, int]]:
    step = hkv if step is None else step
    return [(h, min(h + step, hkv)) for h in range(0, hkv, step)]


# ---------------------------------------------------------------------------------------- checks
def _local_check(q, k, v, cu_seqlens, cp: int, kv_heads_per_step) -> tuple[int, str]:
    """(0, "") when usable; (1, message) for unusable inputs; (2, message) when the sequence cannot be split."""
    tensors = (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens))
    for name, t in tensors:
        if not isinstance(t, Tensor):
            return 1, f"{name}: expected a torch.Tensor, got {type(t).__name__}"
    for name, t in tensors[:3]:
        if t.dim() != 3:
            return 1, f"{name}: expected [S_local, H, D], got shape {tuple(t.shape)}"
        if t.dtype not in _DTYPE_IDS:
            return 1, f"{name}: expected float32, float16 or bfloat16, got {t.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return 1, f"k, v: expected dtype {q.dtype} like q, got {k.dtype}, {v.dtype}"
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        return 1, f"k, v: expected [{q.shape[0]}, Hkv, {q.shape[2]}] like q, got {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return 1, f"k: query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})"
    if kv_heads_per_step is not None and (not isinstance(kv_heads_per_step, int) or kv_heads_per_step < 1):
        return 1, f"kv_heads_per_step: expected None or a positive int, got {kv_heads_per_step!r}"
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        return 1, f"cu_seqlens: expected int32 [N + 1] global offsets, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
    vals = cu_seqlens.tolist()
    total = q.shape[0] * cp
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
        return 1, f"cu_seqlens: expected non-decreasing offsets from 0, got {vals[:8]}…"
    if vals[-1] != total:
        return 2, (
            f"cu_seqlens: covers {vals[-1]} tokens but {cp} ranks × {q.shape[0]} local tokens = {total}: "
            f"every rank must hold 2 of the 2·CP = {2 * cp} equal chunks"
        )
    if total == 0 or total % (2 * cp):
        return 2, f"sequence: {total} tokens cannot be split into 2·CP = {2 * cp} equal chunks"
    return 0, ""


def _validate(q, k, v, cu_seqlens, group, cp: int, kv_heads_per_step) -> None:
    """Exchange a small metadata tensor and raise the same kind of error on every rank if anything disagrees.

    Order: a rank's unusable inputs, then cross-rank mismatches, then a sequence that cannot be split.
    """
    code, message = _local_check(q, k, v, cu_seqlens, cp, kv_heads_per_step)
    fields = [0] * 8
    if code != 1:
        cu = cu_seqlens.to(torch.int64).cpu()
        checksum = int((cu * torch.arange(1, cu.shape[0] + 1)).sum()) % (2**61)
        fields = [q.shape[0], q.shape[1], k.shape[1], q.shape[2], _DTYPE_IDS[q.dtype], cu.shape[0], checksum]
        fields.append(kv_heads_per_step or 0)
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    if str(dist.get_backend(group)) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    meta = torch.tensor([code] + fields, dtype=torch.int64, device=device)
    everyone = meta.new_empty((cp, meta.shape[0]))
    _all_gather_into(everyone, meta, group, async_op=False)
    table = everyone.cpu().tolist()
    prefix = "context_parallel_attention:"
    if code == 1:
        raise ValueError(f"{prefix} {message} (raised on every rank)")
    bad = [r for r, row in enumerate(table) if row[0] == 1]
    if bad:
        raise ValueError(f"{prefix} rank {bad[0]} failed its input checks (see its error; raised on every rank)")
    names = ("local sequence length", "query heads", "KV heads", "head dim", "dtype", "cu_seqlens length",
             "cu_seqlens checksum", "kv_heads_per_step")  # fmt: skip
    for i, name in enumerate(names, start=1):
        col = [row[i] for row in table]
        if len(set(col)) > 1:
            if name == "dtype":
                by_id = {v: str(d).replace("torch.", "") for d, v in _DTYPE_IDS.items()}
                col = [by_id[c] for c in col]
            raise ValueError(f"{prefix} {name} differs across ranks: {col} (raised on every rank)")
    if code == 2:  # the same on every rank now that inputs agree
        raise ValueError(f"{prefix} {message} (raised on every rank)")


# ------------------------------------------------------------------------------------- attention
def _cp_forward(q, k, v, layout: CPLayout, group, scale: float, kv_heads_per_step):
    cp, c = layout.cp_size, layout.chunk
    g = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    lses = [q.new_empty((q.shape[1], c), dtype=torch.float32) for _ in layout.segments]
    steps = _head_steps(k.shape[1], kv_heads_per_step)
    pending = _gather_kv(k, v, steps[0], group, cp)
    for i, (h0, h1) in enumerate(steps):
        k_buf, v_buf, works = pending
        if i + 1 < len(steps):  # prefetch the next heads while this step computes
            pending = _gather_kv(k, v, steps[i + 1], group, cp)
        for w in works:
            w.wait()
        k_all, v_all = _to_global(k_buf), _to_global(v_buf)  # [S, h1-h0, D]
        qh = slice(h0 * g, h1 * g)
        for j, seg in enumerate(layout.segments):
            qs = slice(j * c, (j + 1) * c)
            o, lse = flash_attention(
                q[qs, qh], k_all[seg.k0 : seg.k1], v_all[seg.k0 : seg.k1], True, scale, seg.cu_q, seg.max_q,
                True, cu_seqlens_k=seg.cu_k, max_seqlen_k=seg.max_k,
            )  # fmt: skip
            out[qs, qh], lses[j][qh] = o, lse
    return out, lses


def _cp_backward(dout, q, k, v, out, lses, layout: CPLayout, group, scale: float, kv_heads_per_step):
    cp, c = layout.cp_size, layout.chunk
    g = q.shape[1] // k.shape[1]
    det = torch.are_deterministic_algorithms_enabled()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    steps = _head_steps(k.shape[1], kv_heads_per_step)
    pending, reductions = _gather_kv(k, v, steps[0], group, cp), []
    for i, (h0, h1) in enumerate(steps):
        k_buf, v_buf, works = pending
        if i + 1 < len(steps):
            pending = _gather_kv(k, v, steps[i + 1], group, cp)
        for w in works:
            w.wait()
        k_all, v_all = _to_global(k_buf), _to_global(v_buf)
        # dK/dV of the whole gathered sequence, accumulated in fp32 across both chunks and reduced in fp32
        dk_all = torch.zeros(k_all.shape, dtype=torch.float32, device=k.device)
        dv_all = torch.zeros_like(dk_all)
        qh = slice(h0 * g, h1 * g)
        for j, seg in enumerate(layout.segments):
            qs = slice(j * c, (j + 1) * c)
            dq_j, dk_j, dv_j = flash_attn_bwd(
                dout[qs, qh], q[qs, qh], k_all[seg.k0 : seg.k1], v_all[seg.k0 : seg.k1], out[qs, qh], lses[j][qh],
                seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, True, scale, det,
            )  # fmt: skip
            dq[qs, qh] = dq_j
            dk_all[seg.k0 : seg.k1] += dk_j
            dv_all[seg.k0 : seg.k1] += dv_j
        for dst, full in ((dk, dk_all), (dv, dv_all)):  # async: overlaps the next heads' compute
            reductions.append((dst, (h0, h1), *_reduce_scatter(_to_rank_major(full, cp), group, async_op=True)))
    for dst, (h0, h1), result, work in reductions:
        work.wait()
        dst[:, h0:h1] = result()
    return dq, dk, dv


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, group, scale, kv_heads_per_step):
        out, lses = _cp_forward(q, k, v, layout, group, scale, kv_heads_per_step)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.args = (layout, group, scale, kv_heads_per_step)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *lses = ctx.saved_tensors
        dq, dk, dv = _cp_backward(dout.contiguous(), q, k, v, out, lses, *ctx.args)
        return dq, dk, dv, None, None, None, None


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    group: dist.ProcessGroup | None = None,
    softmax_scale: float | None = None,
    kv_heads_per_step: int | None = None,
    validate: bool = True,
    layout: CPLayout | None = None,
) -> Tensor:
    """Causal, document-masked attention of this rank's two query chunks against the whole sequence's keys.

    Args:
        q: [S_local, Hq, D], this rank's chunks (rank, 2·CP−1−rank) concatenated, as `shard_sequence` makes.
        k, v: [S_local, Hkv, D] likewise; all-gathered across the group (GQA keeps them small).
        cu_seqlens: int32 [N + 1] GLOBAL document offsets over the full sequence (the same on every rank).
        group: the context-parallel process group (None = the default group; uninitialized or size 1 calls
            `flash_attention` directly).
        softmax_scale: defaults to 1 / sqrt(D).
        kv_heads_per_step: all-gather this many KV heads at a time, overlapping the next gather with the
            current heads' attention (two steps' buffers live at once); None gathers all heads at once.
        validate: exchange metadata first so that mismatches raise on every rank instead of hanging.
        layout: a precomputed `cp_layout(cu_seqlens, CP, rank, device)` (skips a host sync); must match.
    Returns:
        [S_local, Hq, D] like q. Differentiable in q, k, v (backward reduce-scatters dK/dV, in fp32).
    Raises:
        ValueError / TypeError naming the argument, on every rank of the group when validate is True:
        mismatched local lengths, heads, dtypes or cu_seqlens across ranks, or a sequence that cannot be
        split into 2·CP equal chunks.
    """
    cp = _group_size(group)
    if cp == 1:
        return flash_attention(q, k, v, True, softmax_scale, cu_seqlens)
    if validate:
        _validate(q, k, v, cu_seqlens, group, cp, kv_heads_per_step)
    rank = dist.get_rank(group)
    if layout is None:
        layout = cp_layout(cu_seqlens, cp, rank, q.device)
    elif (layout.cp_size, layout.rank, 2 * layout.chunk) != (cp, rank, q.shape[0]):
        raise ValueError(f"layout: built for CP {layout.cp_size}, rank {layout.rank}, chunk {layout.chunk}; got "
                         f"CP {cp}, rank {rank}, {q.shape[0]} local tokens")  # fmt: skip
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _ContextParallelAttention.apply(q, k, v, layout, group, scale, kv_heads_per_step)


def make_cp_attn_fn(
    group: dist.ProcessGroup | None,
    cu_seqlens: Tensor,
    softmax_scale: float | None = None,
    kv_heads_per_step: int | None = None,
    validate: str = "first",
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """An `attn_fn(q, k, v)` for `Transformer.forward(..., attn_fn=...)` running context-parallel attention.

    Args:
        group: the CP process group (None = default group; size 1 or uninitialized → plain flash_attention).
        cu_seqlens: int32 [N + 1] global document offsets of this step's packed sequence (`CPBatch.cu_seqlens`).
        softmax_scale, kv_heads_per_step: as in `context_parallel_attention`.
        validate: "first" (check the metadata on the first call only: every layer shares shapes), "always" or
            "never".
    Returns:
        attn_fn taking q [1, S_local, Hq, D], k/v [1, S_local, Hkv, D] and returning [1, S_local, Hq, D].
    Raises:
        ValueError for a bad `validate`; the attn_fn raises ValueError for B != 1 and as
        `context_parallel_attention` does.
    """
    if validate not in ("first", "always", "never"):
        raise ValueError(f"validate: expected 'first', 'always' or 'never', got {validate!r}")
    cp = _group_size(group)
    cu_list = cu_seqlens.tolist()  # one host sync per step, not per layer
    max_len = max(b - a for a, b in zip(cu_list, cu_list[1:]))
    state = {"calls": 0, "layout": None}

    def attn_fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if q.dim() != 4 or q.shape[0] != 1:
            raise ValueError(
                f"q: context parallelism takes one packed sequence [1, S_local, Hq, D], got {tuple(q.shape)}"
            )
        if cp == 1:
            return flash_attention(q[0], k[0], v[0], True, softmax_scale, cu_seqlens, max_len)[None]
        check = validate == "always" or (validate == "first" and state["calls"] == 0)
        if check:
            _validate(q[0], k[0], v[0], cu_seqlens, group, cp, kv_heads_per_step)
        if state["layout"] is None:
            state["layout"] = cp_layout(cu_list, cp, dist.get_rank(group), q.device)
        state["calls"] += 1
        return context_parallel_attention(
            q[0], k[0], v[0], cu_seqlens, group, softmax_scale, kv_heads_per_step, validate=False,
            layout=state["layout"],
        )[None]  # fmt: skip

    return attn_fn
