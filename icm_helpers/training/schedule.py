"""The learning-rate schedule of every training job (Sec. 4.1): constant, then polynomial decay.

Detection: constant, then decayed over the last half of the iterations (the paper's "last 40 of 80 epochs");
segmentation:
"polynomial decay in each epoch", from the start, once per epoch. Power 0.9 (MMSegmentation's default; the paper gives
none); ``power=0`` keeps the rate constant.

A linear warm-up (``warmup_steps``) multiplies the first iterations' rate by (step + 1) / warmup_steps: a fresh Adam's
first updates are about lr * sign(g) on every weight, so starting at the full rate moves a converged codec by a
full step on every weight at once (protocol v2, V2).
"""
from __future__ import annotations

from typing import Callable


def poly_lr_lambda(total_steps: int, start_frac: float, power: float = 0.9, min_factor: float = 0.0,
                   steps_per_decay: int = 1, warmup_steps: int = 0) -> Callable[[int], float]:
    """Multiplier of the initial learning rate at iteration ``step`` (constant, then polynomial decay).

    ``steps_per_decay``: 1 = decay at every iteration; the number of iterations per epoch = decay once per epoch
    (the paper's segmentation setting: "polynomial decay in each epoch", Sec. 4.1)."""
    if not 0.0 <= start_frac < 1.0:
        raise ValueError(f"poly_start_frac must be in [0, 1), got {start_frac}")
    if steps_per_decay < 1:
        raise ValueError(f"steps_per_decay must be >= 1, got {steps_per_decay}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    total_steps = max(1, total_steps // steps_per_decay)
    start = int(round(start_frac * total_steps))

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        step //= steps_per_decay
        if step < start:
            return warm
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return warm * max(min_factor, (1.0 - progress) ** power)

    return factor
