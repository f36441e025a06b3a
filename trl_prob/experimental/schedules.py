"""The research schedules and signals: registered into the core registries when :mod:`trl_prob.experimental` is
imported. None of them was shown to help on a real model (benchmarks/README.md); they are kept, tested, for study.

- signals the adaptive schedule can follow besides ``token_top1`` and ``mean``: ``median``, ``share_confident``,
  ``geomean``, ``p25``, ``sequence_top1_clean``, ``token_top1_clean``, ``confidence``;
- ``cosine``: ``linear``'s ramp on a half cosine (with ``schedule_warmup_start``, a late start);
- ``token_gate``: each token's own lambda from its own confidence (:data:`TOKEN_GATES`), through the schedule seam
  :meth:`~trl_prob.schedules.Schedule.token_lambdas`;
- ``progress``: NLL while the NLL of fresh batches still falls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..schedules import (
    DEFAULT_RAMP,
    SCHEDULES,
    SIGNALS,
    Schedule,
    ScheduleStateError,
    Signal,
    WarmupSchedule,
    ema_update,
    ramp,
    register_schedule,
    register_signal,
)
from ..stats import TokenProbStats

EXPERIMENTAL_SIGNALS = (
    Signal("median", lambda stats: stats.median_p, "median target-token p", metric="median_token_prob",
           columns=frozenset({"histogram"}), title="median target-token p"),
    Signal("share_confident", lambda stats: stats.share_confident,
           "share of target tokens with p > 0.55 (the paper's cut-off)", metric="confident_token_share",
           columns=frozenset({"confident"}), title="share of target tokens with p > 0.55"),
    Signal("geomean", lambda stats: stats.geometric_mean_p,
           "geometric mean of p, exp(-NLL): dominated by the hardest tokens", metric="geomean_token_prob",
           columns=frozenset(), title="geometric mean target-token p"),
    Signal("p25", lambda stats: stats.quantile(0.25),
           "25th percentile of p: where the hard quarter of the tokens stands", metric="p25_token_prob",
           columns=frozenset({"histogram"}), title="25th percentile of target-token p"),
    Signal("sequence_top1_clean", lambda stats: stats.sequence_top1_share_without_conflicts,
           "sequence_top1 where a confident conflict (the model puts sum_v p_v^2 >= 0.5 on another token) does not "
           "spoil a completion: labels a capable model contradicts do not hold the signal down",
           ramp_low=0.20, ramp_high=0.50, metric="sequence_top1_share_without_conflicts",
           reads=("log_probs", "is_top1", "log_sum_sq_probs"), columns=frozenset({"top1_clean"}),
           title="share of completions ranked first but for conflicts"),
    Signal("token_top1_clean", lambda stats: stats.token_top1_share_without_conflicts,
           "token_top1 over the target tokens that are not confident conflicts (the model puts sum_v p_v^2 >= 0.5 "
           "on another token): noisy labels a capable model contradicts do not hold the signal down",
           metric="token_top1_share_without_conflicts", reads=("log_probs", "is_top1", "log_sum_sq_probs"),
           columns=frozenset({"top1", "sum_sq"}), title="share of non-conflicting target tokens ranked first"),
    Signal("confidence", lambda stats: stats.mean_sum_sq_probs,
           "mean sum_v p_v^2 over target positions: how concentrated the model's predictions are, right or wrong",
           metric="mean_sum_sq_probs", reads=("log_probs", "log_sum_sq_probs"),
           columns=frozenset({"sum_sq"}), title="mean sum_v p_v^2"),
)


@dataclass(frozen=True)
class TokenGate:
    """A per-token confidence the ``token_gate`` schedule reads, from the fused head's outputs for that token."""

    name: str
    read: Callable  # HeadTokens -> [batch, seq] tensor in [0, 1], detached
    reads: tuple[str, ...]
    help: str


TOKEN_GATES: dict[str, TokenGate] = {
    gate.name: gate
    for gate in (
        TokenGate("sum_sq", lambda tokens: tokens.sum_sq_probs, ("log_probs", "log_sum_sq_probs"),
                  "the token's sum_v p_v^2 (1/V when the prediction is flat, 1 when certain)"),
        TokenGate("certainty", lambda tokens: 1.0 - tokens.normalised_entropy, ("log_probs", "entropy"),
                  "1 - H / ln V of the token's prediction"),
    )
}


class CosineSchedule(WarmupSchedule):
    """``linear``'s ramp on a half cosine."""

    name = "cosine"


class TokenGateSchedule(Schedule):
    """Each token's own lambda from its own confidence c (:data:`TOKEN_GATES`): clip((c - low) / (high - low), 0, 1).

    No run-wide lambda: a token the model is unsure of trains NLL, one it is confident about (right or, for a noisy
    label, wrong) trains the objective, in the same batch. :attr:`value` is the last step's mean token lambda (for
    logs); the loss reads :meth:`token_lambdas`.
    """

    name = "token_gate"

    def __init__(self, gate: str = "sum_sq", ramp_low: float = DEFAULT_RAMP[0], ramp_high: float = DEFAULT_RAMP[1],
                 **kwargs):
        self.gate, self.ramp_low, self.ramp_high = TOKEN_GATES[gate], ramp_low, ramp_high
        super().__init__(**kwargs)

    @classmethod
    def from_args(cls, args, **common) -> Schedule:
        return cls(gate=args.schedule_token_gate, ramp_low=args.schedule_ramp_low, ramp_high=args.schedule_ramp_high,
                   **common)  # fmt: skip

    def needs(self) -> dict[str, tuple[str, ...]]:
        return {f"schedule_token_gate={self.gate.name!r}": self.gate.reads}

    def trained_lambda(self, stats: TokenProbStats) -> float:
        return stats.mean_lambda  # the step's mean token lambda (the hook puts its sum in the step's all-reduce)

    def token_lambdas(self, tokens, batch=None):
        import torch

        c = self.gate.read(tokens).float()
        return torch.clamp((c - self.ramp_low) / (self.ramp_high - self.ramp_low), 0.0, 1.0)

    def lambda_now(self) -> float:
        return self.value  # set from the step's tokens by the trainer's hook

    def step(self, stats: TokenProbStats) -> float:
        self.p_ema = ema_update(self.p_ema, self.signal(stats), self.ema_decay)
        self.last_step += 1
        mean_lambda = stats.mean_lambda
        if mean_lambda is not None and not math.isnan(mean_lambda):
            self.value = mean_lambda
        return self.value


class ProgressSchedule(Schedule):
    """NLL while the model still learns from fresh data, then toward the objective: learning progress as the signal.

    During the first epoch each optimizer step's NLL is measured on a batch the model has not trained on yet (before
    its update). Its moving average (``ema_decay``) is compared with its value ``window`` steps earlier: lambda =
    clip(1 - r / threshold, 0, 1) with r the relative fall, so lambda stays 0 while the NLL on fresh batches falls by
    ``threshold`` or more per window and reaches 1 when it has stopped falling. After the first epoch the batches are
    no longer fresh: lambda holds. Lambda never decreases.
    """

    name = "progress"

    def __init__(self, window: int = 50, threshold: float = 0.05, fresh_steps: int | None = None, **kwargs):
        self.window, self.threshold, self.fresh_steps = window, threshold, fresh_steps
        self.nll_ema: float | None = None
        self.history: list[float] = []  # the moving average at each of the last `window` steps
        super().__init__(**kwargs)

    @classmethod
    def from_args(cls, args, **common) -> Schedule:
        return cls(window=args.schedule_progress_window, threshold=args.schedule_progress_threshold, **common)

    def begin(self, total_steps: int, steps_per_epoch: int | None = None) -> float:
        self.fresh_steps = steps_per_epoch  # the first epoch's batches are fresh
        return super().begin(total_steps, steps_per_epoch)

    def lambda_now(self) -> float:
        return self.value if self.last_step else 0.0

    def step(self, stats: TokenProbStats) -> float:
        self.p_ema = ema_update(self.p_ema, self.signal(stats), self.ema_decay)
        self.last_step += 1
        if self.fresh_steps is None or self.last_step <= self.fresh_steps:
            self.nll_ema = ema_update(self.nll_ema, stats.nll, self.ema_decay)
            if len(self.history) >= self.window and self.nll_ema is not None and not math.isnan(self.nll_ema):
                before = self.history[-self.window]
                fall = (before - self.nll_ema) / before if before > 0 else 0.0
                self.value = max(self.value, ramp(1.0 - fall / self.threshold))
            self.history = (self.history + [self.nll_ema])[-self.window:]
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "nll_ema": self.nll_ema, "history": list(self.history)}

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        history = state.get("history", [])
        if not isinstance(history, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                    for x in history):  # fmt: skip
            raise ScheduleStateError(f"history must be a list of numbers, got {history!r}")
        nll_ema = state.get("nll_ema")
        if nll_ema is not None and (isinstance(nll_ema, bool) or not isinstance(nll_ema, (int, float))):
            raise ScheduleStateError(f"nll_ema must be null or a number, got {nll_ema!r}")
        self.history, self.nll_ema = [float(x) for x in history], None if nll_ema is None else float(nll_ema)


EXPERIMENTAL_SCHEDULES = (CosineSchedule, TokenGateSchedule, ProgressSchedule)


def register() -> None:
    """Put the research rows into the core registries (once; importing trl_prob.experimental calls it)."""
    for signal in EXPERIMENTAL_SIGNALS:
        if signal.name not in SIGNALS:
            register_signal(signal)
    for kind in EXPERIMENTAL_SCHEDULES:
        if kind.name not in SCHEDULES:
            register_schedule(kind)
