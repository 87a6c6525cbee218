"""`l3k train`: Llama 3 pretraining on the library's kernels, one process or many under torchrun.

One loop for every layout. Single process on CPU: the plain fp32 module. Otherwise (torchrun, or any GPU run)
FSDP2: `fully_shard` on every block and then the root over all ranks, fp32 master weights and optimizer state,
bf16 compute and fp32 gradient reduction on GPU (MixedPrecisionPolicy). With --cp N the world is a dp × cp
mesh: the N ranks of a cp group share each row, split along the sequence by context-parallel attention.

The loss of a step is the mean cross-entropy over every counted target of the step (all micro-steps, all
ranks): each micro-step's summed loss is divided by the step's global target count, which every rank knows
from the data alone, so 1, 2 or N ranks compute the same quantity.

    l3k train --config debug --steps 300 --out runs/debug
    torchrun --nproc-per-node 2 -m llama3_kernels.training.train --config debug --out runs/dp2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llama3_kernels import ops
from llama3_kernels.training import checkpoint as ckpt
from llama3_kernels.training.config import TrainConfig
from llama3_kernels.training.data import IGNORE, Batch, Loader, build_corpus, get_tokenizer, make_batch
from llama3_kernels.training.schedule import accum_at, is_averaged, lr_at

# dense bf16 peak per GPU (no sparsity), for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


# ------------------------------------------------------------------------------------------ layout
@dataclasses.dataclass
class Layout:
    """Where this process sits: ranks, device, data/context-parallel coordinates and groups."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    dp: int = 1
    cp: int = 1
    dp_rank: int = 0
    cp_rank: int = 0
    cp_group: object = None
    fsdp_mesh: object = None  # None: the plain module (single process on CPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_layout(cfg: TrainConfig) -> Layout:
    """Check the layout, then start the process group (torchrun env, or a 1-process group on GPU).

    Raises:
        ValueError: the world size does not divide the batch or cp, or cp is unavailable.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dp, cp = cfg.check_layout(world)  # before any collective: every rank fails the same way
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is visible")
    if cp > 1:
        _cp_module()  # fails clearly when context parallelism is not available
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world == 1 and not cuda:
        return Layout(device=device)
    timeout = timedelta(seconds=cfg.dist_timeout)
    backend = "nccl" if cuda else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout, device_id=device if cuda else None)
    else:  # one GPU without torchrun: a 1-rank group so FSDP2's mixed precision applies
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    from torch.distributed.device_mesh import init_device_mesh

    fsdp_mesh = init_device_mesh(device.type, (world,))
    cp_group = None
    if cp > 1:
        cp_group = init_device_mesh(device.type, (dp, cp), mesh_dim_names=("dp", "cp"))["cp"].get_group()
    cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0
    return Layout(rank, world, device, dp, cp, rank // cp, cp_rank, cp_group, fsdp_mesh)


def _cp_module():
    try:
        from llama3_kernels.distributed import cp
    except ImportError as e:
        raise ValueError(f"cp: context parallelism not available (llama3_kernels.distributed.cp: {e})") from None
    return cp


# ------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, layout: Layout, compute_dtype: torch.dtype | None = None):
    """The model, initialised on the CPU from cfg.seed (the same weights for any world size), then sharded.

    compute_dtype is FSDP2's parameter dtype in forward and backward (default bf16 on GPU, fp32 on CPU); the
    master weights, optimizer state and gradient reduction stay fp32.
    """
    from llama3_kernels.model import Transformer, get_config

    model_cfg = get_config(cfg.model, **cfg.model_overrides)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    if cfg.compile:  # per block and in place: FSDP2 shards the compiled blocks, checkpoint names stay the same
        for layer in model.layers:
            layer.compile()
    if layout.fsdp_mesh is None:
        return model.to(layout.device), model_cfg
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if layout.device.type == "cuda" else torch.float32
    cast = compute_dtype != torch.float32
    root = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if cast else MixedPrecisionPolicy()
    )
    # Blocks must not cast their inputs: FSDP2 would round the fp32 RoPE cos/sin tables they are passed to
    # bf16 in every layer. Their other inputs (the residual stream) are already in the compute dtype.
    block = dataclasses.replace(root, cast_forward_inputs=False)
    for layer in model.layers:
        fully_shard(layer, mesh=layout.fsdp_mesh, mp_policy=block)
    fully_shard(model, mesh=layout.fsdp_mesh, mp_policy=root)
    model.reset_rope()  # the fp32 RoPE tables follow the parameters to the device
    return model, model_cfg


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on the matmul weights only.

    Norm gains and the token embedding are not decayed: a norm gain is a scale, not a feature, and an
    embedding row only receives gradient when its token occurs, so decay would shrink rare tokens' rows
    between their updates. The output projection is a matmul weight and is decayed.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 × matmul parameters + causal attention (6 × layers × dim × seq_len)."""
    c = model_cfg
    hd = c.head_dim
    per_layer = c.dim * hd * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.ffn_dim
    matmul = c.n_layers * per_layer + c.dim * c.vocab_size  # the output head (tied or not) is a matmul
    return 6 * matmul + 6 * c.n_layers * c.dim * seq_len


# ------------------------------------------------------------------------------------------ a step
def _rank_batch(rows, index: torch.Tensor, layout: Layout) -> Batch:
    """The batch of rows `index` on this rank's device; under cp, the rows flattened into one packed sequence
    [1, B * S] of which this rank keeps its two load-balanced chunks (global cu_seqlens kept)."""
    batch = make_batch(rows, index)
    if layout.cp > 1:
        part = _cp_module().shard_batch(
            batch.tokens.flatten(), layout.cp, layout.cp_rank, labels=batch.targets.flatten(),
            positions=batch.positions.flatten(), cu_seqlens=batch.cu_seqlens,
        )  # fmt: skip
        batch = Batch(part.tokens, part.labels, part.positions, part.cu_seqlens, batch.max_seqlen)
    return batch.to(layout.device)


def _forward_loss(model: nn.Module, batch: Batch, layout: Layout) -> torch.Tensor:
    """Summed cross-entropy of the batch's counted targets (this rank's share under cp)."""
    if layout.cp > 1:
        attn_fn = _cp_module().make_cp_attn_fn(layout.cp_group, batch.cu_seqlens)
        logits = model(batch.tokens, batch.positions, attn_fn=attn_fn)
    else:
        logits = model(batch.tokens, batch.positions, batch.cu_seqlens, batch.max_seqlen)
    # fp32 math on the 16-bit logits, without F.cross_entropy(logits.float())'s fp32 copies (ops/loss.py)
    return ops.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")


def _all_sum(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.fsdp_mesh is not None:
        dist.all_reduce(x)
    return x


def _rank_rows(index: torch.Tensor, micro: int, m: int, layout: Layout) -> torch.Tensor:
    """This rank's rows of micro-step m: micro-steps are consecutive slices, ranks split each slice."""
    per_micro = micro * layout.dp
    chunk = index[m * per_micro : (m + 1) * per_micro]
    return chunk[layout.dp_rank * micro : (layout.dp_rank + 1) * micro]


@torch.no_grad()
def evaluate(model: nn.Module, rows, cfg: TrainConfig, layout: Layout) -> float:
    """Mean held-out cross-entropy over the first eval_rows rows (every rank runs the same number of forwards)."""
    model.eval()
    micro = cfg.micro_rows(layout.dp)
    n = max(layout.dp, min(cfg.eval_rows, len(rows)) // layout.dp * layout.dp)
    index = torch.arange(n) % len(rows)
    mine = index[layout.dp_rank :: layout.dp]
    total = torch.zeros(2, dtype=torch.float64, device=layout.device)
    for start in range(0, len(mine), micro):
        batch = _rank_batch(rows, mine[start : start + micro], layout)
        total[0] += _forward_loss(model, batch, layout).double()
        total[1] += int((batch.targets != IGNORE).sum())
    model.train()
    total = _all_sum(total, layout)
    return float(total[0] / total[1].clamp_min(1))


# ----------------------------------------------------------------------------------- checkpointing
def _full_state(model, optimizer, layout: Layout) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state dicts keyed by parameter name, on the CPU of rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    if layout.fsdp_mesh is None:
        model_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model_sd, (get_optimizer_state_dict(model, optimizer) if optimizer is not None else None)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    return model_sd, (get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None)


def _load_state(model, optimizer, model_sd: dict, optim_sd: dict | None, layout: Layout) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=layout.fsdp_mesh is not None)
    if layout.fsdp_mesh is None:
        model.load_state_dict(model_sd)
    else:
        set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def save_checkpoint(path: Path, model, optimizer, cfg, model_cfg, step: int, consumed: int, layout: Layout):
    model_sd, optim_sd = _full_state(model, optimizer, layout)
    if layout.is_main:
        state = {
            "config": cfg.to_dict(), "model_config": dataclasses.asdict(model_cfg), "step": step,
            "data": {"consumed": consumed}, "schedule": {"step": step}, "model": model_sd, "optimizer": optim_sd,
            "rng": ckpt.rng_state(),
        }  # fmt: skip
        ckpt.save_atomic(state, path)
    if layout.fsdp_mesh is not None:
        dist.barrier()


# ------------------------------------------------------------------------------------------- output
class Metrics:
    """JSON lines on rank 0 (out/metrics.jsonl), also kept in memory for the caller."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled, self.records = path, enabled, []
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and path.exists():  # resume: keep what the checkpoint already covers
            old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in old if r["step"] <= keep_until]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict], path: Path) -> None:
    """Train and eval loss against the step, as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("l3k train: matplotlib not installed, no loss plot", file=sys.stderr)
        return
    train = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r["type"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# --------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) training.

    Args:
        cfg: the run's config.
    Returns:
        The metric records of the run (on rank 0; other ranks return an empty list), resumed part included.
    Raises:
        ValueError / FileNotFoundError on bad input, before any training step.
    """
    layout = setup_layout(cfg)
    try:
        records = _train(cfg, layout)
        if dist.is_initialized():
            dist.barrier()  # no rank closes its transport while a peer is still finishing a collective
        return records
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, layout: Layout) -> list[dict]:
    from llama3_kernels.model import get_config

    out = Path(cfg.out)
    model_cfg = get_config(cfg.model, **cfg.model_overrides)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len: {cfg.seq_len} exceeds the {cfg.model} config's max_seq_len {model_cfg.max_seq_len}")
    if cfg.cp > 1 and cfg.seq_len % (2 * cfg.cp):
        raise ValueError(
            f"seq_len: context parallelism over {cfg.cp} ranks needs a multiple of {2 * cfg.cp}, got {cfg.seq_len}"
        )
    saved = None
    if cfg.resume:
        saved = ckpt.load(out / "checkpoint.pt")
        ckpt.check_compatible(saved, cfg, dataclasses.asdict(model_cfg))
    tokenizer = get_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer: {tokenizer.vocab_size} ids do not fit the model's vocab_size {model_cfg.vocab_size}"
        )
    corpus = build_corpus(cfg.data, cfg.seq_len, cfg.eval_fraction, cfg.corpus_bytes, tokenizer)
    micro = cfg.micro_rows(layout.dp)

    model, model_cfg = build_model(cfg, layout)
    optimizer = make_optimizer(model, cfg)
    loader = Loader(corpus.train, cfg.seed)
    start, consumed = 0, 0
    if saved is not None:
        _load_state(model, optimizer, saved["model"], saved["optimizer"], layout)
        start, consumed = saved["step"], saved["data"]["consumed"]
        ckpt.set_rng_state(saved["rng"])
        del saved
    metrics = Metrics(out / "metrics.jsonl", layout.is_main, keep_until=start if cfg.resume else None)
    if layout.is_main and not cfg.resume:
        (out / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "model": dataclasses.asdict(model_cfg),
                                                     "corpus": {"sha256": corpus.fingerprint, "rows": len(corpus.train),
                                                                "documents": corpus.n_docs}}, indent=2))  # fmt: skip

    fpt, peak = flops_per_token(model_cfg, cfg.seq_len), _peak_flops(layout.device)
    stop = cfg.stop_at if cfg.stop_at is not None else cfg.steps
    bar = None
    if layout.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=stop, initial=start, desc=f"train {cfg.model}", unit="step", dynamic_ncols=True)
    model.train()
    for step in range(start, stop):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        accum = accum_at(step, cfg)
        index = loader.indices(consumed, accum * micro * layout.dp)  # the whole step's rows, all ranks
        n_valid = loader.valid_targets(index)
        scale = layout.world / max(n_valid, 1)  # FSDP averages gradients over ranks: undo it, then mean over targets
        loss_sum = torch.zeros((), dtype=torch.float64, device=layout.device)
        for m in range(accum):
            if layout.fsdp_mesh is not None:
                model.set_requires_gradient_sync(m == accum - 1)  # reduce-scatter once per step
            batch = _rank_batch(corpus.train, _rank_rows(index, micro, m, layout), layout)
            loss = _forward_loss(model, batch, layout) * scale
            loss.backward()
            loss_sum += loss.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        consumed += len(index)
        loss_value = float(_all_sum(loss_sum, layout)) / layout.world
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss: not finite at step {step + 1} ({loss_value})")
        dt = time.perf_counter() - t0
        tokens = len(index) * cfg.seq_len
        record = {"type": "train", "step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": tokens, "tokens_per_s": tokens / dt, "memory_gib": _memory_gib(layout.device)}  # fmt: skip
        if peak is not None:
            record["mfu"] = fpt * tokens / dt / (peak * layout.world)
        metrics.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:,.0f}")
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            loss_eval = evaluate(model, corpus.held_out, cfg, layout)
            metrics.log({"type": "eval", "step": done, "loss": loss_eval, "perplexity": math.exp(min(loss_eval, 50))})
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps:
            save_checkpoint(out / "checkpoint.pt", model, optimizer, cfg, model_cfg, done, consumed, layout)
        if is_averaged(step, cfg):
            model_sd, _ = _full_state(model, None, layout)
            if layout.is_main:
                ckpt.save_atomic(model_sd, out / "anneal" / f"step_{done:07d}.pt")
    if bar is not None:
        bar.close()
    if stop == cfg.steps:
        _finish(model, cfg, model_cfg, corpus, layout, metrics, out)
    return metrics.records if layout.is_main else []


def _finish(model, cfg, model_cfg, corpus, layout: Layout, metrics: Metrics, out: Path) -> None:
    """Final weights, checkpoint averaging over the annealing phase, and the loss plot."""
    model_sd, _ = _full_state(model, None, layout)
    if layout.is_main:
        ckpt.save_atomic({"model": model_sd, "model_config": dataclasses.asdict(model_cfg)}, out / "model.pt")
    if cfg.anneal_steps:
        first = cfg.steps - cfg.anneal_steps
        snaps = [
            out / "anneal" / f"step_{s:07d}.pt" for s in range(first + 1, cfg.steps + 1) if is_averaged(s - 1, cfg)
        ]
        avg = {k: v.double() for k, v in torch.load(snaps[0], weights_only=True).items()}
        for path in snaps[1:]:
            for k, v in torch.load(path, weights_only=True).items():
                avg[k] += v.double()
        avg = {k: (v / len(snaps)).float() for k, v in avg.items()}  # master weights are fp32 in every layout
        _load_state(model, None, avg, None, layout)
        loss_avg = evaluate(model, corpus.held_out, cfg, layout)
        metrics.log({"type": "eval_averaged", "step": cfg.steps, "loss": loss_avg, "checkpoints": len(snaps),
                     "perplexity": math.exp(min(loss_avg, 50))})  # fmt: skip
        if layout.is_main:
            ckpt.save_atomic({"model": avg, "model_config": dataclasses.asdict(model_cfg)}, out / "model_averaged.pt")
    if layout.is_main:
        plot_losses(metrics.records, out / "loss.png")


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> TrainConfig:
    """Flags → TrainConfig: the model's preset recipe, then every flag given on top."""
    p = argparse.ArgumentParser(prog="l3k train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="debug", help="model config: debug, 1b, 3b, 8b, 135m or a full name")
    p.add_argument("--data", help="text file, folder or JSONL ({'text': ...}); default: the stdlib sources")
    p.add_argument("--steps", type=int)
    p.add_argument("--out", help="output folder (default runs/<config>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--batch-size", type=int, help="rows per optimizer step (global)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--batch-ramp", type=lambda s: tuple(int(x) for x in s.split(",") if x), help="e.g. 100,200")
    p.add_argument("--anneal-steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-rows", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--cp", type=int, help="context-parallel degree")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop-at", type=int, help="stop after this step as if interrupted")
    p.add_argument("--tokenizer", help="Llama 3 tiktoken model file (default: bytes)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--corpus-bytes", type=int)
    p.add_argument("--n-layers", type=int, help="override the model's layer count (quick experiments)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile each block")
    args = vars(p.parse_args(argv))
    model = args.pop("config")
    if (n_layers := args.pop("n_layers")) is not None:
        args["model_overrides"] = {"n_layers": n_layers}
    args = {k: v for k, v in args.items() if v is not None and v is not False}
    args.setdefault("out", f"runs/{model}")
    return TrainConfig.for_model(model, **args)


def main(argv: list[str] | None = None) -> int:
    """`l3k train` (and `python -m llama3_kernels.training.train` under torchrun); returns the exit status."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        train(cfg)
    except (ValueError, FileNotFoundError, KeyError) as e:
        rank = os.environ.get("RANK")
        print(f"l3k train: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
