"""The trainer's one config object: a typed dataclass, per-model recipe presets, and the layout checks.

Batch vocabulary: a *row* is one packed sequence of `seq_len` tokens. `batch_size` is the number of rows per
optimizer step (globally, at the end of any batch-size ramp); it is split into `grad_accum` micro-steps and
over the data-parallel ranks, so every rank runs micro-batches of `batch_size // (grad_accum * dp)` rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# `--config` aliases for the published sizes
ALIASES = {"1b": "llama3.2-1b", "3b": "llama3.2-3b", "8b": "llama3.1-8b", "70b": "llama3.1-70b", "135m": "smollm2-135m"}

# recipe defaults per model (Llama 3 paper §3.4.1 scaled down: peak lr falls as the model grows); flags override
PRESETS: dict[str, dict] = {
    "debug": dict(seq_len=256, batch_size=8, lr=3e-3, warmup=20, steps=300),
    "smollm2-135m": dict(seq_len=2048, batch_size=32, lr=3e-3, warmup=200, steps=10000),
    "llama3.2-1b": dict(seq_len=4096, batch_size=32, lr=3e-4, warmup=2000, steps=100000),
    "llama3.2-3b": dict(seq_len=4096, batch_size=64, lr=3e-4, warmup=2000, steps=100000),
    "llama3.1-8b": dict(seq_len=8192, batch_size=64, lr=3e-4, warmup=2000, steps=100000),
}


@dataclass
class TrainConfig:
    """Everything a training run depends on. Fields that change the math are checked again on --resume.

    Attributes:
        model: a model config name (`llama3_kernels.model.get_config`) or an alias from ALIASES.
        model_overrides: ModelConfig fields to change (tests shrink or alter the model this way).
        data: a text file, a folder of text files, or a JSONL file of {"text": ...}; None = the embedded
            corpus (this Python's standard library sources, sorted, the first `corpus_bytes`).
        corpus_bytes: cap on the embedded corpus (user data is never truncated).
        eval_fraction: share of documents held out for evaluation (every round(1/f)-th document).
        seq_len: tokens per packed row.
        batch_size: rows per optimizer step (global, after the ramp).
        grad_accum: micro-steps per optimizer step (after the ramp).
        batch_ramp: steps (1-based, as logged) from which tokens per step double, starting from
            batch_size / 2**len(batch_ramp) (the ramp drops micro-steps, so grad_accum must be a multiple of
            2**len(batch_ramp)).
        steps: optimizer steps in the whole run (the schedule spans all of them).
        lr, min_lr_ratio, warmup: peak learning rate, cosine floor as a fraction of it, linear warm-up steps.
        anneal_steps: final steps whose learning rate falls linearly to 0; checkpoints taken every
            `anneal_avg_every` of them are averaged into model_averaged.pt (0 = no annealing).
        weight_decay, beta1, beta2, eps, grad_clip: AdamW and clipping (Llama 3: 0.1, 0.9, 0.95, -, 1.0).
        eval_every, eval_rows: evaluation period in steps (0 = only at the end) and held-out rows used.
        ckpt_every: checkpoint period in steps (0 = only at the end).
        out: output folder (metrics.jsonl, checkpoint.pt, model.pt, loss.png).
        resume: continue from out/checkpoint.pt.
        cp: context-parallel degree (ranks sharing each sequence); dp = world size // cp.
        seed: initialisation and data order.
        stop_at: stop after this step as if killed: nothing is saved beyond the periodic checkpoints (the schedule
            still spans `steps`); None = run to the end.
        tokenizer: path of a Llama 3 tiktoken model; None = bytes (ByteTokenizer, vocab >= 258).
        device: "auto" (cuda when available), "cpu" or "cuda".
        dist_timeout: seconds a rank waits in a collective before the job fails instead of hanging.
        progress: show a tqdm bar on rank 0.
        compile: torch.compile each transformer block in place (state-dict names unchanged): Inductor fuses the
            elementwise work around the library's ops (RoPE, residual adds, casts); the ops stay opaque kernels.
    """

    model: str = "debug"
    model_overrides: dict = field(default_factory=dict)
    data: str | None = None
    corpus_bytes: int = 2_000_000
    eval_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    batch_ramp: tuple[int, ...] = ()
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.01
    warmup: int = 20
    anneal_steps: int = 0
    anneal_avg_every: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_rows: int = 16
    ckpt_every: int = 100
    out: str = "runs/train"
    resume: bool = False
    cp: int = 1
    seed: int = 0
    stop_at: int | None = None
    tokenizer: str | None = None
    device: str = "auto"
    dist_timeout: float = 300.0
    progress: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        self.model = ALIASES.get(self.model, self.model)
        self.batch_ramp = tuple(int(s) for s in self.batch_ramp)
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "cp", "eval_rows", "corpus_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("warmup", "anneal_steps", "eval_every", "ckpt_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
        if self.anneal_avg_every <= 0:
            raise ValueError(f"anneal_avg_every: expected a positive int, got {self.anneal_avg_every!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive float, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected a value in (0, 1), got {self.eval_fraction!r}")
        if self.warmup + self.anneal_steps > self.steps:
            raise ValueError(f"warmup, anneal_steps: {self.warmup} + {self.anneal_steps} exceed steps ({self.steps})")
        if list(self.batch_ramp) != sorted(set(self.batch_ramp)) or any(s <= 0 for s in self.batch_ramp):
            raise ValueError(f"batch_ramp: expected increasing positive steps, got {self.batch_ramp}")
        if self.grad_accum % 2 ** len(self.batch_ramp):
            raise ValueError(
                f"grad_accum: the batch ramp halves micro-steps {len(self.batch_ramp)} times, so grad_accum must be "
                f"a multiple of {2 ** len(self.batch_ramp)}, got {self.grad_accum}"
            )
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"stop_at: expected a step in [1, {self.steps}], got {self.stop_at!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")

    @classmethod
    def for_model(cls, model: str = "debug", **changes) -> TrainConfig:
        """The preset recipe for `model`, with `changes` applied on top."""
        name = ALIASES.get(model, model)
        return cls(model=name, **{**PRESETS.get(name, {}), **changes})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def micro_rows(self, dp: int) -> int:
        """Rows per micro-batch on each data-parallel rank."""
        return self.batch_size // (self.grad_accum * dp)

    def check_layout(self, world_size: int) -> tuple[int, int]:
        """Split the world into (dp, cp) and check that the batch divides over it.

        Args:
            world_size: number of ranks.
        Returns:
            (dp, cp) degrees.
        Raises:
            ValueError naming cp or batch_size when the world cannot run this config.
        """
        if world_size % self.cp:
            raise ValueError(f"cp: the world size ({world_size}) must be a multiple of cp ({self.cp})")
        dp = world_size // self.cp
        if self.batch_size % (self.grad_accum * dp):
            raise ValueError(
                f"batch_size: {self.batch_size} rows per step must split evenly into grad_accum ({self.grad_accum}) "
                f"micro-steps on {dp} data-parallel rank(s) (world size {world_size}, cp {self.cp})"
            )
        return dp, self.cp

    # fields whose change makes a checkpoint's continuation a different run
    RESUME_KEYS = ("model", "model_overrides", "data", "corpus_bytes", "eval_fraction", "seq_len", "batch_size",
                   "grad_accum", "batch_ramp", "steps", "lr", "min_lr_ratio", "warmup", "anneal_steps",
                   "weight_decay", "beta1", "beta2", "eps", "seed", "tokenizer")  # fmt: skip
