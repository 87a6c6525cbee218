"""Split-KV decode attention merged inside a thread-block cluster (csrc/attention/flash_fwd.cu), on an H100.

The splits of one (sequence, KV head, row block) run as one cluster: each CTA leaves its normalized partial output
and log-sum-exp in its own shared memory, and after a cluster barrier the CTAs merge the rows between them by
reading their peers' shared memory, in the combine kernel's order. So the cluster path must give the same bits as
the fp32-workspace + combine-kernel path for the same split count (which tests/test_attention_cuda.py checks
against the fp32 reference), and the op must launch no combine kernel. Its own file, so bench/device_check.sh
gates it on its own (clustergate: a failure sets L3K_DECODE_CLUSTER=0 for the rest of the run).
"""

import math

import pytest
import torch

from llama3_kernels import reference
from llama3_kernels.ops import attention as attn
from llama3_kernels.ops._common import DTYPE_CODES, has_kernel, kernel, ptr, sm_count, stream

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _need() -> None:
    for name in ("decode_attn", "decode_attn_max_cluster"):
        if not has_kernel(name):
            pytest.skip(f"_C.{name} was not built")


def _case(gen, b, sq, hq, hkv, d, length, dtype):
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype)

    q, k, v = randn(b, sq, hq, d), randn(b, length, hkv, d), randn(b, length, hkv, d)
    lens = torch.randint(sq, length + 1, (b,), generator=gen)
    lens[0] = length  # a full cache; the second row (if any) holds a few keys, so most of its splits are empty
    if b > 1:
        lens[1] = min(length, sq + 3)
    return q, k, v, lens.to(device="cuda", dtype=torch.int32)


def _launch(q, k, v, lens, splits, cluster):
    """The raw launcher into a NaN-poisoned output; the combine path gets its fp32 workspaces."""
    b, sq, hq, d = q.shape
    hkv, length = k.shape[2], k.shape[1]
    out = torch.full_like(q, float("nan"))
    o_acc = torch.full((splits, b, sq, hq, d), float("nan"), device="cuda")
    lse_acc = torch.full((splits, b, sq, hq), float("nan"), device="cuda")
    kernel("decode_attn")(
        ptr(q), ptr(k), ptr(v), ptr(lens), ptr(out), 0 if cluster else ptr(o_acc), 0 if cluster else ptr(lse_acc),
        splits, cluster, b, sq, hq, hkv, d, length, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        1.0 / math.sqrt(d), DTYPE_CODES[q.dtype], sm_count(0), stream(q),
    )  # fmt: skip
    torch.cuda.synchronize()
    return out


def _max_cluster(q, hkv):
    b, sq, hq, d = q.shape
    return kernel("decode_attn_max_cluster")(d, DTYPE_CODES[q.dtype], sq * (hq // hkv))


def test_the_occupancy_query_allows_large_clusters():
    """The launcher's occupancy query: at least the portable 8 CTAs for every decode tile (16, non-portable, is what
    the batch-1 split count was sized for; the sizes are printed for the record)."""
    _need()
    sizes = {
        (d, rows): kernel("decode_attn_max_cluster")(d, DTYPE_CODES[torch.bfloat16], rows)
        for d in (64, 128)
        for rows in (4, 64)
    }
    print("decode_attn_max_cluster (d, rows per KV head) ->", sizes)
    assert all(s >= 8 for s in sizes.values()), sizes
    with pytest.raises(ValueError, match="^rows_per_kv_head:"):
        kernel("decode_attn_max_cluster")(64, DTYPE_CODES[torch.bfloat16], 0)


# rows a KV head: 4 and 8 (the warps-split-keys tile), 20 and 100 (the rows-split tile, 1 and 2 row blocks)
@pytest.mark.parametrize(
    "b,sq,hq,hkv,d,length",
    [(1, 1, 32, 8, 64, 4096), (2, 1, 32, 8, 128, 1000), (2, 4, 10, 2, 64, 777), (1, 25, 8, 2, 128, 555),
     (3, 2, 16, 4, 64, 300)],
)  # fmt: skip
@pytest.mark.parametrize("splits", [2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cluster_merge_equals_the_combine_kernel(gen, b, sq, hq, hkv, d, length, splits, dtype):
    """Same split count, same bits: every output element written (NaN-poisoned), empty splits (a short cache)
    weigh nothing."""
    _need()
    q, k, v, lens = _case(gen, b, sq, hq, hkv, d, length, dtype)
    splits = min(splits, _max_cluster(q, hkv))
    mine, theirs = _launch(q, k, v, lens, splits, True), _launch(q, k, v, lens, splits, False)
    assert not mine.isnan().any(), f"unwritten outputs (seed {gen.initial_seed()})"
    assert torch.equal(mine, theirs), f"max diff {(mine.float() - theirs.float()).abs().max().item():.3g}"


def test_op_launches_no_combine_kernel_and_matches_the_switch(gen, monkeypatch):
    """Through the op (batch-1 decode of the 1B model's shape): no combine kernel, values within the fp32
    reference's reach like the switched-off path (L3K_DECODE_CLUSTER=0, which does launch one)."""
    _need()
    q, k, v, lens = _case(gen, 1, 1, 32, 8, 64, 4096, torch.bfloat16)
    ref = reference.decode_attention(q.float(), k.float(), v.float(), lens, 1.0 / 8)
    outs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("L3K_DECODE_CLUSTER", switch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            outs[switch] = attn.decode_attention(q, k, v, lens)
            torch.cuda.synchronize()
        combined = any("combine_splits" in e.key for e in prof.key_averages())
        assert combined == (switch == "0"), (switch, [e.key for e in prof.key_averages()])
    worst = (outs["0"].float() - ref).abs().max().item()
    assert (outs["1"].float() - ref).abs().max().item() <= 2 * worst + torch.finfo(torch.bfloat16).eps


def test_cluster_launch_in_a_cuda_graph(gen):
    """Captured and replayed (the decode step's graph) after the cache grows: the eager result each time."""
    _need()
    q, k, v, lens = _case(gen, 1, 1, 32, 8, 128, 2048, torch.bfloat16)
    lens.fill_(1000)
    stream_ = torch.cuda.Stream()
    stream_.wait_stream(torch.cuda.current_stream())  # the inputs above were written on the current stream
    with torch.cuda.stream(stream_):
        attn.decode_attention(q, k, v, lens)  # warm-up (and the occupancy query) outside the capture
    torch.cuda.current_stream().wait_stream(stream_)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.decode_attention(q, k, v, lens)
    for n in (1000, 1500, 2048):
        lens.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, attn.decode_attention(q, k, v, lens)), n
