"""Learning rate and batch size as pure functions of the step (Llama 3 paper §3.4.1 and §3.1.3).

Learning rate: linear warm-up to the peak, cosine decay to `min_lr_ratio` × peak at the last step (or at the
start of annealing), then, when annealing, a linear fall to 0 over the final steps. Being a function of the
step alone, the schedule's whole state is the step number, which the checkpoint stores.
Batch size: the paper doubles tokens per step in stages; here each stage doubles the number of micro-steps,
so micro-batch shapes (and memory) never change.
"""

from __future__ import annotations

import math

from llama3_kernels.training.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Args:
        step: the step about to be taken, in [0, cfg.steps).
        cfg: the run's config (lr, warmup, min_lr_ratio, steps, anneal_steps).
    Returns:
        The learning rate.
    Raises:
        ValueError: step outside [0, cfg.steps).
    """
    if not 0 <= step < cfg.steps:
        raise ValueError(f"step: expected a value in [0, {cfg.steps}), got {step}")
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    decay_end = cfg.steps - cfg.anneal_steps  # the cosine reaches the floor here
    if step < decay_end:
        span = max(decay_end - 1 - cfg.warmup, 1)
        progress = min((step - cfg.warmup) / span, 1.0)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    # annealing: from the floor down to 0 at the last step's end
    return floor * (cfg.steps - step) / (cfg.anneal_steps + 1)


def accum_at(step: int, cfg: TrainConfig) -> int:
    """Micro-steps for optimizer step `step` (0-based): grad_accum halved once per ramp boundary not yet reached
    (a boundary b is the 1-based step, as logged, from which on the batch has doubled)."""
    pending = sum(1 for boundary in cfg.batch_ramp if step + 1 < boundary)
    return cfg.grad_accum >> pending


def is_averaged(step: int, cfg: TrainConfig) -> bool:
    """True when the model after step `step` (0-based) is one of the checkpoints averaged during annealing."""
    if cfg.anneal_steps == 0:
        return False
    done = step + 1  # steps finished
    into = done - (cfg.steps - cfg.anneal_steps)
    return into > 0 and (into % cfg.anneal_avg_every == 0 or done == cfg.steps)
