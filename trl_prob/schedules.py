"""Objective schedules: how far training has moved from NLL toward the target objective (lambda in [0, 1]).

Pure functions of numbers; the trainer decides when to call them (once per optimizer step).

- ``constant``: lambda = ``objective_lambda``.
- ``linear`` / ``cosine``: lambda rises from 0 to 1 over the first ``warmup_ratio`` of the optimizer steps.
- ``adaptive``: lambda = clip((p_ema - p_low) / (p_high - p_low), 0, 1), where p_ema is an exponential
  moving average of the per-step statistic of the target-token probabilities (mean, median or share of
  tokens above 0.55). The paper's finding, made dynamic: NLL while the model is weak on the data,
  the prior-leaning objective once it is confident.

Two ways to apply lambda (``schedule_mode``):
- ``blend``: loss = (1 - lambda) * nll + lambda * target;
- ``exponent``: train ``power:(lambda * k)`` for a ``power:k`` target (``power:0`` is NLL), so the
  family itself slides from NLL to -p^k.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SCHEDULES = ("none", "constant", "linear", "cosine", "adaptive")
MODES = ("blend", "exponent")
STATISTICS = ("mean", "median", "share_confident")


def ramp(x: float) -> float:
    """Linear ramp clipped to [0, 1]."""
    return min(1.0, max(0.0, x))


def warmup_lambda(step: int, total_steps: int, warmup_ratio: float, shape: str = "linear") -> float:
    """Lambda after ``step`` completed optimizer steps, rising to 1 over ``warmup_ratio * total_steps`` steps."""
    warmup_steps = warmup_ratio * total_steps
    progress = 1.0 if warmup_steps <= 0 else ramp(step / warmup_steps)
    if shape == "linear":
        return progress
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    raise ValueError(f"Unknown warm-up shape {shape!r}; allowed: linear, cosine.")


def adaptive_lambda(p_ema: float, p_low: float, p_high: float) -> float:
    """Lambda from the running statistic: 0 at or below ``p_low``, 1 at or above ``p_high``, linear between."""
    return ramp((p_ema - p_low) / (p_high - p_low))


def ema_update(previous: float | None, value: float, decay: float) -> float:
    """Exponential moving average; the first value (or a NaN one, from a step without tokens) is taken as is."""
    if previous is None or math.isnan(previous):
        return value
    if math.isnan(value):
        return previous
    return decay * previous + (1.0 - decay) * value


@dataclass
class ScheduleState:
    """What a checkpoint must carry for a resumed run to follow the same trajectory."""

    step: int = 0
    p_ema: float | None = None
    objective_lambda: float = 0.0
    warm_started: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScheduleState:
        return cls(**{k: data[k] for k in ("step", "p_ema", "objective_lambda", "warm_started") if k in data})


def next_lambda(
    schedule: str,
    *,
    step: int,
    total_steps: int,
    p_ema: float | None,
    previous_lambda: float,
    objective_lambda: float = 1.0,
    warmup_ratio: float = 0.1,
    p_low: float = 0.30,
    p_high: float = 0.55,
    monotone: bool = False,
) -> float:
    """Lambda for the optimizer step after ``step`` completed ones. ``none`` means the target objective alone."""
    if schedule == "none":
        value = 1.0
    elif schedule == "constant":
        value = objective_lambda
    elif schedule in ("linear", "cosine"):
        value = warmup_lambda(step, total_steps, warmup_ratio, schedule)
    elif schedule == "adaptive":
        value = 0.0 if p_ema is None or math.isnan(p_ema) else adaptive_lambda(p_ema, p_low, p_high)
    else:
        raise ValueError(f"Unknown objective schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}.")
    return max(value, previous_lambda) if monotone else value
