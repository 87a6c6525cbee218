"""Distributed pieces: context-parallel attention as Llama 3 trains long context (`cp`), and its scale model
(`plan`, the `l3k cp-plan` command)."""

from llama3_kernels.distributed.cp import (
    CPBatch,
    CPLayout,
    chunk_ranges,
    context_parallel_attention,
    cp_attention_flops,
    cp_layout,
    doc_ids_to_cu_seqlens,
    gather_sequence,
    make_cp_attn_fn,
    shard_batch,
    shard_sequence,
    unshard_sequence,
)

__all__ = [
    "CPBatch",
    "CPLayout",
    "chunk_ranges",
    "context_parallel_attention",
    "cp_attention_flops",
    "cp_layout",
    "doc_ids_to_cu_seqlens",
    "gather_sequence",
    "make_cp_attn_fn",
    "shard_batch",
    "shard_sequence",
    "unshard_sequence",
]
