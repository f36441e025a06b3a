"""Objective schedules: how far training has moved from NLL toward the target objective (lambda in [0, 1]).

A schedule is a small object in the style of torch's LR schedulers: ``step(stats)`` once per optimizer step
returns lambda for the next step, ``state_dict()`` / ``load_state_dict()`` carry it through checkpoints. It knows
nothing about trainers: it takes the step's target-token statistics (:class:`~trl_prob.stats.TokenProbStats`).

- ``none``: lambda = 1, the target objective alone.
- ``constant``: lambda = ``schedule_constant_lambda``.
- ``linear``: lambda rises from 0 to 1 over the first ``warmup_ratio`` of the optimizer steps.
- ``adaptive``: lambda = clip((ema - low) / (high - low), 0, 1), where ema is an exponential moving average of a
  per-step signal of the model's confidence on the target tokens (:data:`SIGNALS`), read on the ramp low -> high.
  The paper's finding, made dynamic: NLL while the model is weak on the data, the prior-leaning objective once it
  is confident.

The research kinds (``cosine``, ``token_gate``, ``progress``) register themselves from :mod:`trl_prob.experimental`:
a kind is one :func:`register_schedule` call, built from the config by its own :meth:`Schedule.from_args`, and gives
each token its lambda through :meth:`Schedule.token_lambdas` (the seam the loss reads), so nothing here branches on it.

Every schedule keeps the signal's moving average (``p_ema`` in its state, logged as ``schedule_signal_ema``). Two ways to apply lambda (``schedule_mode``):
``blend`` trains (1 - lambda) nll + lambda target; ``exponent`` trains ``power:(lambda k)`` for a ``power:k``
target, so the family itself slides from NLL to -p^k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .stats import ALL_COLUMNS, TokenProbStats, column_groups

MODES = ("blend", "exponent")
# The ramp a signal is read on unless it (or the user) says otherwise: lambda 0 at and below 0.30, 1 from 0.55.
DEFAULT_RAMP = (0.30, 0.55)


@dataclass(frozen=True)
class Signal:
    """A per-step signal the adaptive schedule can follow, with the ramp it is read on by default.

    Every signal is read from the statistics the step already reduces (one all-reduce per optimizer step), and
    declares which of the fused head's per-token outputs those statistics need (:data:`~trl_prob.head.HEAD_OUTPUTS`).
    """

    name: str
    read: Callable[[TokenProbStats], float]
    help: str
    ramp_low: float = DEFAULT_RAMP[0]
    ramp_high: float = DEFAULT_RAMP[1]
    metric: str | None = None  # logged under this name every step (None: already logged by the trainer)
    reads: tuple[str, ...] = ("log_probs",)
    # the statistics' column groups `read` needs beyond the base ones (stats.COLUMN_GROUPS; unsaid: all of them)
    columns: frozenset[str] = ALL_COLUMNS
    title: str = ""  # what the number is, for log lines and plots ("share of target tokens ranked first")

    @property
    def ramp(self) -> tuple[float, float]:
        return self.ramp_low, self.ramp_high

    @property
    def label(self) -> str:
        return self.title or self.help


SIGNALS: dict[str, Signal] = {}


def register_signal(signal: Signal) -> Signal:
    """Add a signal to the registry (its name must be free); the config, CLI help and probe read the registry."""
    if signal.name in SIGNALS:
        raise ValueError(f"Signal {signal.name!r} already registered.")
    from .head import union

    union([signal.reads])  # its reads name head outputs
    column_groups(signal.columns)  # and its columns name statistics column groups
    SIGNALS[signal.name] = signal
    return signal


def unregister_signal(name: str) -> None:
    SIGNALS.pop(name)


for _signal in (
    Signal("mean", lambda stats: stats.mean_p, "mean target-token p, the paper's capability proxy (its Eq. 5)",
           columns=frozenset(), title="mean target-token p"),
    Signal("token_top1", lambda stats: stats.token_top1_share,
           "share of target tokens that are the model's top-1 choice", metric="token_top1_share",
           reads=("log_probs", "is_top1"), columns=frozenset({"top1"}), title="share of target tokens ranked first"),
    # what the model can do on the task: a completion counts only if greedy decoding would write all of it (every
    # target token its first choice); numbers copied from the prompt no longer make a model that cannot answer read
    # as capable (SmolLM2 on MAWPS: token_top1 0.64, mean p 0.61, while it writes 1.8% of the answers)
    Signal("sequence_top1", lambda stats: stats.sequence_top1_share,
           "share of completions whose every target token is the model's top-1 (teacher-forced exact match)",
           ramp_low=0.20, ramp_high=0.50, metric="sequence_top1_share", reads=("log_probs", "is_top1"),
           columns=frozenset({"top1"}), title="share of completions ranked first throughout"),
):
    register_signal(_signal)
# More signals (median, geomean, p25, sequence_top1_clean, ...) are research rows: `import trl_prob.experimental`.
# The adaptive schedule's default signal: the one that reads what the model can do (benchmarks/README.md, "Trajectory
# places and the capability signal"): its warm start puts lambda at 0 where the base writes under 5% of the answers.
DEFAULT_SIGNAL = "sequence_top1"


def ramp(x: float) -> float:
    """Linear ramp clipped to [0, 1]."""
    return min(1.0, max(0.0, x))


def warmup_lambda(step: int, total_steps: int, warmup_ratio: float, shape: str = "linear", start: float = 0.0) -> float:
    """Lambda after ``step`` completed optimizer steps: 0 until ``start * total_steps``, then rising to 1 over
    ``warmup_ratio * total_steps`` steps."""
    warmup_steps = warmup_ratio * total_steps
    step = step - start * total_steps
    if step < 0:
        return 0.0
    progress = 1.0 if warmup_steps <= 0 else ramp(step / warmup_steps)
    if shape == "linear":
        return progress
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    raise ValueError(f"Unknown warm-up shape {shape!r}; allowed: linear, cosine.")


def adaptive_lambda(ema: float, low: float, high: float) -> float:
    """Lambda from the running signal: 0 at or below ``low``, 1 at or above ``high``, linear between."""
    return ramp((ema - low) / (high - low))


def ema_update(previous: float | None, value: float, decay: float) -> float:
    """Exponential moving average; the first value (or a NaN one, from a step without tokens) is taken as is."""
    if previous is None or math.isnan(previous):
        return value
    if math.isnan(value):
        return previous
    return decay * previous + (1.0 - decay) * value


class ScheduleStateError(ValueError):
    """A saved schedule state that cannot be loaded; the message names the field and what is allowed."""


class Schedule:
    """Lambda for the next optimizer step; ``step(stats)`` after each optimizer step.

    Args:
        signal: name of the per-step signal in :data:`SIGNALS` that p_ema averages.
        ema_decay: decay of p_ema, in [0, 1).
        monotone: never let lambda decrease.
    """

    name: ClassVar[str]
    warm_starts: ClassVar[bool] = False  # whether a probe of the base model before step 1 initialises p_ema

    def __init__(self, *, signal: str = DEFAULT_SIGNAL, ema_decay: float = 0.9, monotone: bool = False):
        self.signal_name = signal
        self.ema_decay = ema_decay
        self.monotone = monotone
        self.total_steps = 0
        self.last_step = 0
        self.p_ema: float | None = None
        self.warm_started = False
        self.value = self.initial_value

    initial_value: ClassVar[float] = 0.0  # lambda before training begins (e.g. an evaluation before train())

    @classmethod
    def from_args(cls, args, **common) -> Schedule:
        """This kind built from a [`ProbSFTConfig`]; ``common`` holds signal, ema_decay and whatever the config's
        ``schedule_kwargs`` adds (trl_prob.experimental: monotone, a late start)."""
        return cls(**common)

    def needs(self) -> dict[str, tuple[str, ...]]:
        """The fused head's outputs this schedule reads per token, by who reads them (none by default)."""
        return {}

    def stats_columns(self) -> frozenset[str]:
        """The statistics' column groups :meth:`step` reads (its signal's; a kind reading more says so)."""
        return SIGNALS[self.signal_name].columns

    def token_lambdas(self, tokens, batch=None):
        """The lambda each target token of a micro-batch trains with: one float for the whole step (this default), or a
        ``[batch, seq]`` tensor (the hook then adds the step's mean token lambda to the statistics it all-reduces).
        ``batch``: the micro-batch's :class:`~trl_prob.extension.BatchInfo` (a run extension's seam is the same)."""
        return self.value

    def trained_lambda(self, stats: TokenProbStats) -> float:
        """The lambda the finished step trained with, for the logs (read before :meth:`step`)."""
        return self.value

    def lambda_now(self) -> float:
        """Lambda after ``last_step`` completed steps, before the monotone hold."""
        raise NotImplementedError

    def signal(self, stats: TokenProbStats) -> float:
        return SIGNALS[self.signal_name].read(stats)

    def warm_start(self, stats: TokenProbStats) -> None:
        """Start p_ema from a measurement of the base model rather than from the first (noisy) step."""
        self.p_ema = self.signal(stats)
        self.warm_started = True

    def begin(self, total_steps: int, steps_per_epoch: int | None = None) -> float:
        """Lambda of the first optimizer step of a fresh run over ``total_steps`` steps (``steps_per_epoch`` for kinds
        that tell fresh batches from repeated ones)."""
        self.total_steps = total_steps
        self.value = self._held(self.lambda_now(), previous=0.0)
        return self.value

    def step(self, stats: TokenProbStats) -> float:
        """Account one finished optimizer step (its statistics over all micro-batches and processes)."""
        self.p_ema = ema_update(self.p_ema, self.signal(stats), self.ema_decay)
        self.last_step += 1
        self.value = self._held(self.lambda_now(), previous=self.value)
        return self.value

    def _held(self, value: float, previous: float) -> float:
        return max(value, previous) if self.monotone else value

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.last_step,
            "p_ema": self.p_ema,
            "objective_lambda": self.value,
            "warm_started": self.warm_started,
        }

    def load_state_dict(self, state: Any) -> None:
        """Restore a :meth:`state_dict`; raises :class:`ScheduleStateError` naming what is wrong."""
        if not isinstance(state, dict):
            raise ScheduleStateError(f"expected a JSON object with step, p_ema, objective_lambda, warm_started, got {state!r}")
        missing = [key for key in ("step", "objective_lambda") if key not in state]
        if missing:
            raise ScheduleStateError(f"missing {', '.join(missing)}")
        step, p_ema, value = state["step"], state.get("p_ema"), state["objective_lambda"]
        warm_started = state.get("warm_started", False)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ScheduleStateError(f"step must be an integer >= 0, got {step!r}")
        if p_ema is not None and (isinstance(p_ema, bool) or not isinstance(p_ema, (int, float))
                                  or not (math.isnan(p_ema) or 0.0 <= p_ema <= 1.0)):
            raise ScheduleStateError(f"p_ema must be null or a number in [0, 1], got {p_ema!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ScheduleStateError(f"objective_lambda must be a number in [0, 1], got {value!r}")
        if not isinstance(warm_started, bool):
            raise ScheduleStateError(f"warm_started must be true or false, got {warm_started!r}")
        self.last_step, self.value, self.warm_started = step, float(value), warm_started
        self.p_ema = None if p_ema is None else float(p_ema)


class NoSchedule(Schedule):
    """The target objective alone."""

    name = "none"
    initial_value = 1.0

    def lambda_now(self) -> float:
        return 1.0


class ConstantSchedule(Schedule):
    """A fixed blend: lambda = ``constant_lambda`` throughout (``schedule_constant_lambda``)."""

    name = "constant"

    def __init__(self, constant_lambda: float = 1.0, **kwargs):
        self.constant_lambda = constant_lambda
        super().__init__(**kwargs)

    @classmethod
    def from_args(cls, args, **common) -> Schedule:
        return cls(constant_lambda=args.schedule_constant_lambda, **common)

    def lambda_now(self) -> float:
        return self.constant_lambda


class WarmupSchedule(Schedule):
    """0 -> 1 over the first ``warmup_ratio`` of the optimizer steps, linear or half-cosine."""

    name = "linear"

    def __init__(self, warmup_ratio: float = 0.1, start: float = 0.0, **kwargs):
        self.warmup_ratio, self.start = warmup_ratio, start
        super().__init__(**kwargs)

    @classmethod
    def from_args(cls, args, **common) -> Schedule:
        # the product ramp starts at step 0; a late `start` comes in `common` from a config subclass's
        # schedule_kwargs (trl_prob.experimental's schedule_warmup_start)
        return cls(warmup_ratio=args.schedule_warmup_ratio, **common)

    def lambda_now(self) -> float:
        return warmup_lambda(self.last_step, self.total_steps, self.warmup_ratio, self.name, self.start)


class AdaptiveSchedule(Schedule):
    """clip((ema - low) / (high - low), 0, 1): NLL while unsure, the target once confident."""

    name = "adaptive"
    warm_starts = True

    def __init__(self, ramp_low: float = DEFAULT_RAMP[0], ramp_high: float = DEFAULT_RAMP[1], **kwargs):
        self.ramp_low, self.ramp_high = ramp_low, ramp_high
        super().__init__(**kwargs)

    @classmethod
    def from_args(cls, args, **common) -> Schedule:
        return cls(ramp_low=args.schedule_ramp_low, ramp_high=args.schedule_ramp_high, **common)

    def needs(self) -> dict[str, tuple[str, ...]]:
        return {f"schedule_signal={self.signal_name!r}": SIGNALS[self.signal_name].reads}

    def lambda_now(self) -> float:
        if self.p_ema is None or math.isnan(self.p_ema):
            return 0.0  # nothing measured yet: NLL
        return adaptive_lambda(self.p_ema, self.ramp_low, self.ramp_high)


SCHEDULES: dict[str, type[Schedule]] = {}


def register_schedule(cls: type[Schedule]) -> type[Schedule]:
    """Add a schedule kind to the registry (its name must be free); the config and the CLI help read the registry."""
    if cls.name in SCHEDULES:
        raise ValueError(f"Schedule {cls.name!r} already registered.")
    SCHEDULES[cls.name] = cls
    return cls


for _kind in (NoSchedule, ConstantSchedule, WarmupSchedule, AdaptiveSchedule):
    register_schedule(_kind)


def build_schedule(args) -> Schedule:
    """The schedule a [`ProbSFTConfig`] asks for."""
    kind = args.objective_schedule
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown objective schedule {kind!r}; allowed: {', '.join(SCHEDULES)}.")
    cls = SCHEDULES[kind]
    # a config subclass's knobs (trl_prob.experimental: monotone, a late start) come through its schedule_kwargs
    common = dict(signal=args.schedule_signal, ema_decay=args.schedule_ema_decay, **args.schedule_kwargs(cls))
    return cls.from_args(args, **common)
