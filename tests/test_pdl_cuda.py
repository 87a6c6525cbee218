"""Programmatic dependent launch of the decode step's kernels (default on; L3K_PDL=0 turns it off; csrc/common.h),
on an H100.

Its own file, so bench/device_check.sh gates it on its own (pdlgate: a failure sets L3K_PDL=0 for the rest of the
run): a PDL-only failure (graph capture with the launch attribute, say) must not turn off the decode GEMV.
"""

import pytest
import torch

from llama3_kernels.ops._common import has_kernel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _need() -> None:
    for name in ("decode_gemv", "rope_kv_cache", "decode_attn"):
        if not has_kernel(name):
            pytest.skip(f"_C.{name} was not built")


# which decode kernels run: the default (the q/k/v GEMV epilogue, the cluster merge), the split combine kernel, and
# the unfused GEMV + rope_kv_cache. Prompt lengths: one row (a 256-slot cache: 4 splits), two rows, and four rows with
# a long one (a 2048-slot cache: 8 KV-head CTAs x 16 splits of 2 tiles, the largest clusters)
VARIANTS = {
    "default": {},
    "combine kernel": {"L3K_DECODE_CLUSTER": "0"},
    "rope_kv_cache": {"L3K_DECODE_GEMV": "0"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("lengths", [(37,), (37, 5), (1900, 5, 300, 77)])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_pdl_launches_change_nothing(monkeypatch, cuda_graph, lengths, variant):
    """PDL launches the decode step's kernels (the GEMVs with the q/k/v epilogue, the decode attention and its
    cluster merge or split combine, rope_kv_cache where it runs) as programmatic dependents, so each may start during
    the previous one's tail. They must wait for it before touching its data: the same tokens and bit-identical KV
    caches as ordinary launches, eager and replayed from a CUDA graph (a read before the wait would see a previous
    layer's or step's values)."""
    _need()
    from llama3_kernels.generate import Generator
    from llama3_kernels.model import Transformer, get_config

    for key, value in VARIANTS[variant].items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(3)
    cfg = get_config("debug", n_layers=4, max_seq_len=2048)
    model = Transformer(cfg).to("cuda", torch.bfloat16)
    prompts = [[int(t) for t in torch.randint(0, 256, (n,))] for n in lengths]
    runs = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("L3K_PDL", pdl)
        g = Generator(model, cuda_graph=cuda_graph)
        result = g.generate(prompts, max_new_tokens=24, stop_ids=[])
        assert result.cuda_graph == cuda_graph  # a failed capture would decode eagerly with a warning
        tokens = result.tokens
        caches = [t.clone() for layer in model.layers for t in (layer.attention.k_cache, layer.attention.v_cache)]
        runs.append((tokens, caches))
        g.release()
    (tokens0, caches0), (tokens1, caches1) = runs
    assert tokens0 == tokens1
    assert all(torch.equal(a, b) for a, b in zip(caches0, caches1))
