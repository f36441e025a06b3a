"""``ProbSFTConfig``: TRL's ``SFTConfig`` plus the objective and its schedule."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from . import check_trl_version

check_trl_version()

from trl import SFTConfig  # noqa: E402

from .objectives import get_objective, objective_help  # noqa: E402
from .schedules import DEFAULT_SIGNAL, MODES, SCHEDULES, SIGNALS  # noqa: E402

logger = logging.getLogger(__name__)

def has_accelerator() -> bool:
    """A GPU (or other torch accelerator) is there for the run."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX), so bf16 autocast is faster than float32 there.

    oneDNN, which runs CPU matmuls, can be held below the CPU's instruction set (``ONEDNN_MAX_CPU_ISA=AVX2``): bf16 is
    then emulated (SmolLM2-135M forward + backward: 15x the float32 time on an AVX512-BF16 CPU held at AVX2).
    """
    import os

    import torch

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if isa != "ALL" and "BF16" not in isa and "AMX" not in isa:
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


@dataclass
class ProbSFTConfig(SFTConfig):
    r"""
    Configuration for [`ProbSFTTrainer`]: every [`~trl.SFTConfig`] field, plus the following.

    Parameters:
        > The objective

        objective (`str`, *optional*, defaults to `"nll"`):
            Per-token objective of "Beyond Log Likelihood": `nll`, `p`, `power:a`, `top_p:q`, `bottom_p:q`,
            `top_logp:q`, `bottom_logp:q`, `dft`, or the paper repo's keys (`original`, `GeneralFamily-8`,
            `OnlyTopP-0.2`, ...), the confidence-aware `deft`, `deft_cayley`, `eaft:alpha`, `asft[:alpha]`, or `auto`
            (the objective and schedule a benchmark's pre-written rule chose; `trl_prob.auto`). With a schedule, this
            is the target the schedule moves toward.

        > The schedule (from NLL toward `objective`)

        objective_schedule (`str`, *optional*, defaults to `"none"`):
            `none` (train `objective` alone), `constant` (a fixed blend, `schedule_constant_lambda`), `linear` (lambda
            0 -> 1 over `schedule_warmup_ratio` of the steps) or `adaptive` (lambda follows the running signal of the
            model's confidence from `schedule_ramp_low` to `schedule_ramp_high`). Research kinds (`cosine`,
            `token_gate`, `progress`) come with `import trl_prob.experimental` (`--experimental`).
        schedule_mode (`str`, *optional*, defaults to `"blend"`):
            `blend`: loss = (1 - lambda) nll + lambda objective. `exponent`: train `power:(lambda k)` for a
            `power:k` objective, so the family itself slides from NLL (a = 0) to -p^k.
        schedule_constant_lambda (`float`, *optional*, defaults to `1.0`):
            The `constant` schedule's lambda, in [0, 1] (1 = the objective alone). The lambda a step trains with is
            logged as `objective_lambda`.
        schedule_warmup_ratio (`float`, *optional*, defaults to `0.1`):
            Share of the optimizer steps over which `linear` lambda rises from 0 to 1.
        schedule_signal (`str`, *optional*, defaults to `"sequence_top1"`):
            Per-step signal that `adaptive` follows: `sequence_top1` (share of completions whose every target token
            is the model's top-1: the teacher-forced exact match, what the model can do on the task), `token_top1`
            (share of target tokens that are the model's top-1) or `mean` (mean target-token p, the paper's
            capability proxy, its Eq. 5). More signals with `--experimental`.
        schedule_ramp_low (`float`, *optional*):
            Signal at and below which `adaptive` lambda is 0 (pure NLL). Defaults to the signal's own ramp
            (`sequence_top1`: 0.20; `token_top1`, `mean`: 0.30).
        schedule_ramp_high (`float`, *optional*):
            Signal at and above which `adaptive` lambda is 1 (the objective alone). Defaults to the signal's own
            ramp (`sequence_top1`: 0.50; `token_top1`, `mean`: 0.55). Why not the paper's clean-data bands:
            docs/evidence.md.
        schedule_ema_decay (`float`, *optional*, defaults to `0.9`):
            Decay of the exponential moving average of the per-step signal, in [0, 1): about 10 optimizer steps.
        schedule_warm_start_samples (`int`, *optional*, defaults to `256`):
            `adaptive`: training samples measured before step 1 to start the moving average from the base model
            rather than from the first noisy step; 0 starts it from the first step.
        schedule_reset_on_resume (`bool`, *optional*, defaults to `False`):
            Resume from a checkpoint that holds no schedule state by starting the schedule afresh. Without it such
            a checkpoint is refused: the resumed run would follow a different trajectory.

        > Evaluation

        `eval_loss` is the loss training minimises, evaluated: the objective at the live lambda, so under a schedule it
        changes meaning as lambda moves. `eval_nll` beside it is the evaluation's mean NLL per target token, the same
        quantity at every step (also `eval_mean_token_prob`, `eval_exact_match`). Under a schedule that moves lambda
        (not `none` / `constant`), ranking checkpoints on `eval_loss` (`load_best_model_at_end`, `EarlyStoppingCallback`)
        is refused: set `metric_for_best_model="eval_nll"` (lower is better; `greater_is_better` defaults to `False`).
    """

    objective: str = field(default="nll", metadata={"help": objective_help()})
    objective_schedule: str = field(
        default="none",
        metadata={
            "help": "How training moves from NLL toward `objective`: none, constant, linear or adaptive (lambda follows "
            "the model's running confidence on its target tokens)."
        },
    )
    schedule_mode: str = field(
        default="blend",
        metadata={
            "help": "blend: (1 - lambda) nll + lambda objective; exponent: power:(lambda k) for a power:k objective.",
            "choices": list(MODES),
        },
    )
    schedule_constant_lambda: float = field(
        default=1.0, metadata={"help": "The `constant` schedule's lambda, in [0, 1] (1 = the objective alone)."}
    )
    schedule_warmup_ratio: float = field(
        default=0.1, metadata={"help": "Share of optimizer steps over which `linear` lambda rises 0 -> 1."}
    )
    schedule_signal: str = field(
        default=DEFAULT_SIGNAL,
        metadata={
            "help": "Signal the adaptive schedule follows: sequence_top1 (share of completions the model ranks first "
            "throughout: teacher-forced exact match), token_top1 (share of target tokens it ranks first) or mean (mean "
            "target-token p, the paper's Eq. 5)."
        },
    )
    schedule_ramp_low: float | None = field(
        default=None,
        metadata={"help": "Adaptive: signal at and below which lambda = 0 (pure NLL); default: the signal's ramp."},
    )
    schedule_ramp_high: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive: signal at and above which lambda = 1 (the objective alone); default: the signal's ramp."
        },
    )
    schedule_ema_decay: float = field(
        default=0.9, metadata={"help": "Decay of the moving average of the per-step signal, in [0, 1)."}
    )
    schedule_warm_start_samples: int = field(
        default=256,
        metadata={
            "help": "Adaptive: training samples measured before step 1 to start the moving average from the base "
            "model (0: from the first step)."
        },
    )
    schedule_reset_on_resume: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint without schedule state by restarting the schedule (otherwise refused)."
        },
    )
    # ASFT's reference (trl_prob/asft.py), as TRL's trainers that take one name it.
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reference model of --objective asft (its KL anchor) for full fine-tuning: a path or hub id with "
            "the model's vocabulary. LoRA runs default to their own base with the adapters disabled."
        },
    )

    def __post_init__(self):
        self.objective_auto = isinstance(self.objective, str) and self.objective.strip().lower() == "auto"
        if self.objective_auto:  # the benchmark's choice (trl_prob/auto.py), before anything reads the fields
            from .auto import resolve

            resolve(self)
        self._validate_objective_fields()
        self._cpu_precision = self._choose_cpu_precision()
        super().__post_init__()

    def _choose_cpu_precision(self) -> tuple[int, str] | None:
        """On a CPU run, bf16 autocast only where the CPU computes bf16 natively, unless ``bf16`` was set explicitly.

        TRL turns ``bf16`` on by default; a CPU without AVX512-BF16 or AMX emulates it, and a training step or a probe
        is then about 10x slower than in float32 (SmolLM2-135M LoRA, 2 rows of 192 tokens: 161 s vs 15.5 s). Returns
        ``(log level, the one line that says which precision and why)``, logged by the trainer; ``None`` off CPU.
        Without any accelerator the run is a CPU run even without ``use_cpu``, which is then set (transformers
        refuses bf16 without it).
        """
        if not (self.use_cpu or not has_accelerator()) or self.fp16:
            return None
        native = cpu_has_native_bf16()
        explicit = self.bf16 is not None
        if not explicit:
            self.bf16 = native
        if self.bf16:
            self.use_cpu = True
        if not self.bf16:
            why = "bf16 is off" if explicit else (
                "this CPU has no native bf16 (no AVX512-BF16 or AMX), where TRL's default bf16 autocast is emulated "
                "and about 10x slower; pass --bf16 true to use it anyway"
            )
            return logging.INFO if explicit else logging.WARNING, f"trl-prob: CPU run in float32 ({why})."
        if native:
            why = "--bf16 true" if explicit else "this CPU computes bf16 natively; pass --bf16 false for float32"
            return logging.INFO, f"trl-prob: CPU run under bf16 autocast ({why})."
        return logging.WARNING, (
            "trl-prob: CPU run under bf16 autocast (--bf16 true), which this CPU emulates (no AVX512-BF16 or AMX): "
            "expect about 10x the float32 time; pass --bf16 false for float32."
        )

    def _validate_objective_fields(self) -> None:
        target = get_objective(self.objective)
        self.objective = target.spec

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; allowed: {', '.join(allowed)}.")

        choice("objective_schedule", tuple(SCHEDULES))
        choice("schedule_mode", MODES)
        choice("schedule_signal", tuple(SIGNALS))
        signal = SIGNALS[self.schedule_signal]
        # the ramp as given, before the signal's own fills it in (None: the signal's): a schedule reading another
        # signal (trl_prob.experimental's per-source signals) takes that signal's ramp where the run gave none
        self.ramp_given = (self.schedule_ramp_low, self.schedule_ramp_high)
        if self.schedule_ramp_low is None:
            self.schedule_ramp_low = signal.ramp_low
        if self.schedule_ramp_high is None:
            self.schedule_ramp_high = signal.ramp_high

        def unit_interval(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}.")

        for name in ("schedule_constant_lambda", "schedule_warmup_ratio", "schedule_ramp_low", "schedule_ramp_high"):
            unit_interval(name)
        if self.schedule_ramp_low >= self.schedule_ramp_high:
            raise ValueError(
                f"schedule_ramp_low ({self.schedule_ramp_low}) must be below schedule_ramp_high "
                f"({self.schedule_ramp_high})."
            )
        if not (math.isfinite(self.schedule_ema_decay) and 0.0 <= self.schedule_ema_decay < 1.0):
            raise ValueError(f"schedule_ema_decay must be in [0, 1), got {self.schedule_ema_decay!r}.")
        if isinstance(self.schedule_warm_start_samples, bool) or not isinstance(self.schedule_warm_start_samples, int) \
                or self.schedule_warm_start_samples < 0:
            raise ValueError(f"schedule_warm_start_samples must be an integer >= 0 (0: no warm start), got "
                             f"{self.schedule_warm_start_samples!r}.")
        if self.objective_schedule != "none" and target.family == "nll":
            raise ValueError(
                f"objective_schedule={self.objective_schedule!r} moves from NLL toward `objective`, which is nll: "
                "set `objective` to the target, e.g. power:10 or p."
            )
        if self.schedule_mode == "exponent" and target.family != "power":
            raise ValueError(
                f"schedule_mode='exponent' slides power:(lambda k) toward a power:k objective; objective is "
                f"{target.spec!r}. Use schedule_mode='blend' or objective='power:k'."
            )

        # Combinations whose loss TRL computes outside the fused log-prob head, where our objective cannot act.
        if self.loss_type == "dft" and target.family != "nll":
            raise ValueError(
                f"loss_type='dft' is TRL's own DFT loss and would replace objective {target.spec!r}. "
                "Use objective='dft' (same loss) with the default loss_type='nll'."
            )
        if (self.label_smoothing_factor or 0) > 0 and target.family != "nll":
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} makes TRL compute the loss from full logits, "
                f"bypassing objective {target.spec!r}. Set label_smoothing_factor=0."
            )
        if self.use_liger_kernel and self.uses_objective:
            # Liger's default config turns its fused linear cross-entropy on: it replaces the model's forward and
            # computes plain NLL itself, outside TRL's fused log-prob head where the objective acts. Whatever a given
            # TRL release does with that default, a non-NLL run is not left to depend on it.
            raise ValueError(
                f"use_liger_kernel=True with objective {target.spec!r}: Liger's fused linear cross-entropy (on by "
                "default with use_liger_kernel) computes plain NLL outside TRL's fused log-prob head, where the "
                "objective cannot act. Set use_liger_kernel=False (Hub kernels: model_init_kwargs={'use_kernels': "
                "True}), or train objective='nll'."
            )
        if self.use_liger_kernel and (self.liger_kernel_config or {}).get("fused_linear_cross_entropy"):
            raise ValueError(
                "Liger's fused linear cross-entropy replaces the model's forward and computes NLL itself; trl-prob "
                "needs TRL's fused log-prob head. Set liger_kernel_config={'fused_linear_cross_entropy': False}."
            )
        self._check_best_metric()
        self._validate_more()
        parallelism = getattr(self, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False) and self.uses_objective:
            raise ValueError(
                "Sequence parallelism (Ulysses/ALST) reduces the model's own NLL across ranks, so "
                f"objective {target.spec!r} cannot be applied. Disable sequence parallelism."
            )

    def _check_best_metric(self) -> None:
        """``eval_loss`` is the trained loss, the objective at the live lambda: under a schedule that moves lambda, two
        evaluations' ``eval_loss`` measure different things, so neither the best checkpoint (``load_best_model_at_end``)
        nor early stopping (``EarlyStoppingCallback``, which reads ``metric_for_best_model``) may rank by it. The
        evaluation's NLL, ``eval_nll`` (lower is better), means one thing all along."""
        metric = self.metric_for_best_model
        if metric is not None and metric.removeprefix("eval_") == "nll" and self.greater_is_better is None:
            self.greater_is_better = False  # transformers would take a name not ending in "loss" as greater-is-better
        if self.objective_schedule in ("none", "constant"):
            return
        ranks_by_loss = metric in ("loss", "eval_loss") or (metric is None and self.load_best_model_at_end)
        if ranks_by_loss:
            given = "unset (eval_loss with load_best_model_at_end)" if metric is None else repr(metric)
            raise ValueError(
                f"metric_for_best_model is {given}, but under objective_schedule={self.objective_schedule!r} eval_loss "
                "is the objective at the live lambda, which moves during training, so checkpoints cannot be ranked or "
                "stopped on it (load_best_model_at_end, EarlyStoppingCallback): set metric_for_best_model='eval_nll' "
                "(the evaluation's NLL, lower is better)."
            )

    # ------------------------------------------------------------------------------------- a subclass's seams
    # What a subclass (trl_prob.experimental.ExperimentalSFTConfig) adds to a run, asked by the core through these
    # methods only: the core neither imports a subclass nor reads its fields.

    def _validate_more(self) -> None:
        """A subclass's own checks, after the objective's."""

    def schedule_kwargs(self, kind: type) -> dict:
        """Keyword arguments a subclass adds to ``kind.from_args`` (a :class:`~trl_prob.schedules.Schedule` class) beside
        the core's ``signal`` and ``ema_decay``: none here."""
        return {}

    @property
    def flush_subnormals(self) -> bool:
        """Flush subnormal floats to zero on a CPU run (p-weighted objectives run 2x faster): always, here."""
        return True

    def run_extension(self):
        """The run's plug-in (:class:`trl_prob.extension.RunExtension`), or None: none here."""
        return None

    @property
    def start_objective(self) -> str:
        """The objective a blend trains at lambda 0: NLL here, the paper's continuum."""
        return "nll"

    @property
    def uses_objective(self) -> bool:
        """False only for plain NLL, where the trainer leaves TRL's loss untouched."""
        return not (get_objective(self.objective).family == "nll" and self.objective_schedule == "none")
