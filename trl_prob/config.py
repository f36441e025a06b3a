"""``ProbSFTConfig``: TRL's ``SFTConfig`` plus the objective and its schedule."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from . import check_trl_version

check_trl_version()

from trl import SFTConfig  # noqa: E402

from .objectives import get_objective, objective_help  # noqa: E402
from .schedules import DEFAULT_RAMP, DEFAULT_SIGNAL, MODES, SCHEDULES, SIGNALS, TOKEN_GATES  # noqa: E402

logger = logging.getLogger(__name__)

# Old option name -> its name now; the old one is still accepted, with one deprecation line.
DEPRECATED_FIELDS = {
    "schedule_statistic": "schedule_signal",
    "schedule_p_low": "schedule_ramp_low",
    "schedule_p_high": "schedule_ramp_high",
    "schedule_source_statistic": "schedule_source_signal",
}


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
            `OnlyTopP-0.2`, ...), `deft`, `deft_cayley`, `eaft:alpha`, or `auto` (the objective and schedule the
            benchmark's pre-written rule chose; `trl_prob.auto`). With a schedule, this is the target the schedule
            moves toward.

        > The schedule (from NLL toward `objective`)

        objective_schedule (`str`, *optional*, defaults to `"none"`):
            `none` (train `objective` alone), `constant` (fixed blend `objective_lambda`), `linear` / `cosine`
            (lambda 0 -> 1 over `schedule_warmup_ratio` of the steps), `token_gate` (each token's own lambda from its
            own confidence, `schedule_token_gate`), `progress` (NLL while the fresh-batch NLL still falls) or
            `adaptive` (lambda follows the running
            signal of the model's confidence from `schedule_ramp_low` to `schedule_ramp_high`).
        schedule_mode (`str`, *optional*, defaults to `"blend"`):
            `blend`: loss = (1 - lambda) nll + lambda objective. `exponent`: train `power:(lambda k)` for a
            `power:k` objective, so the family itself slides from NLL (a = 0) to -p^k.
        objective_lambda (`float`, *optional*, defaults to `1.0`):
            Lambda of the `constant` schedule, in [0, 1] (1 = the objective alone).
        schedule_warmup_ratio (`float`, *optional*, defaults to `0.1`):
            Share of the optimizer steps over which `linear` / `cosine` lambda rises from 0 to 1.
        schedule_warmup_start (`float`, *optional*, defaults to `0.0`):
            `linear` / `cosine`: share of the optimizer steps that train NLL before lambda starts to rise (a ramp
            from NLL to the objective starting late in the run).
        schedule_token_gate (`str`, *optional*, defaults to `"sum_sq"`):
            `token_gate`: the per-token confidence that sets each token's own lambda on the ramp
            `schedule_ramp_low` -> `schedule_ramp_high`: `sum_sq` (sum_v p_v^2) or `certainty` (1 - H / ln V).
        schedule_progress_window (`int`, *optional*, defaults to `50`), schedule_progress_threshold (`float`,
        *optional*, defaults to `0.05`):
            `progress`: lambda stays 0 while the NLL of fresh (first-epoch) batches falls by `threshold` or more
            (relative) per `window` optimizer steps, and rises to 1 as that fall stops.
        schedule_signal (`str`, *optional*, defaults to `"token_top1"`):
            Per-step signal that `adaptive` follows (`trl_prob.schedules.SIGNALS`): `token_top1` (share of target
            tokens that are the model's top-1; the default, chosen by benchmarks/signals.py's rule over 9 rows of 3
            task families: behind the best fixed objective in 1 row, `mean` in 2), `mean` (the paper's proxy, its
            Eq. 5; the default before), `median`, `share_confident` (share of tokens with p > 0.55, the paper's
            cut-off), `geomean` (exp(-NLL)), `p25` (25th percentile of p) or `sequence_top1` (share of completions
            whose every target token is the model's top-1), `token_top1_clean` (`token_top1` leaving out confident
            conflicts), `confidence` (mean sum_v p_v^2). Formerly `schedule_statistic` (still accepted).
        schedule_ramp_low (`float`, *optional*):
            Signal at and below which `adaptive` lambda is 0 (pure NLL). Defaults to the signal's own ramp
            (0.30 for most signals, 0.20 for `sequence_top1`). Formerly `schedule_p_low`.
        schedule_ramp_high (`float`, *optional*):
            Signal at and above which `adaptive` lambda is 1 (the objective alone). Defaults to the signal's own
            ramp (0.55 for most signals, 0.50 for `sequence_top1`). Formerly `schedule_p_high`.

            Why 0.30 -> 0.55 and not the paper's clean-data bands (strong end 0.76 - 0.81): the mean target
            probability is capped near (1 - label noise) x (probability on clean tokens), since the model
            should not believe the noisy answers. In a CPU miniature (2-digit addition, 40% noisy answers,
            strong base model) the mean sat near 0.6: a 0.45 -> 0.75 ramp left lambda near 0 and scored like
            NLL (0.91 vs 0.99 exact match for `p`), while 0.30 -> 0.55 matched the best fixed objective at the
            strong end and beat NLL at the weak end (0.50 vs 0.40: NLL first, then `p` once confident). The
            weak end of the paper sits at 0.01 - 0.07, far below 0.30, so weak models keep training NLL.
        schedule_ema_decay (`float`, *optional*, defaults to `0.9`):
            Decay of the exponential moving average p_ema of the per-step statistic, in [0, 1). 0.9 averages
            over about 10 optimizer steps: enough to smooth a noisy small batch, quick enough to follow a
            model that learns within a few hundred steps.
        schedule_monotone (`bool`, *optional*, defaults to `False`):
            Never let lambda decrease.
        schedule_warm_start (`bool`, *optional*):
            Initialise p_ema from a measurement of the base model on the first `schedule_warm_start_samples`
            training samples before step 1, rather than from the first noisy step. Defaults to on for `adaptive`.
        schedule_warm_start_samples (`int`, *optional*, defaults to `256`):
            Number of training samples the warm start measures.
        schedule_reset_on_resume (`bool`, *optional*, defaults to `False`):
            Resume from a checkpoint that holds no schedule state by starting the schedule afresh. Without it such
            a checkpoint is refused: the resumed run would follow a different trajectory.

        > Per-source schedules (mixed data: each source at its own place on the continuum)

        schedule_per_source (`bool`, *optional*, defaults to `False`):
            One `adaptive` schedule per data source: each source's lambda follows the signal of its own target tokens
            and applies to its own tokens, so a base strong on one source and weak on another trains the first toward
            `objective` and the second with NLL in the same batch. With one source it is the run-wide schedule.
            Packing is refused (it joins rows of different sources into one sequence); padding-free batching works.
        source_column (`str`, *optional*, defaults to `"source"`):
            Column of the training (and evaluation) data that names each row's source. `trl-prob sft` fills it from a
            `datasets:` mixture (one source per entry) when the data have no such column.
        schedule_sources (`list[str]`, *optional*):
            The sources, in order (at most 64). Defaults to the distinct values of `source_column` in the training
            data, sorted. A row whose source is not listed is an error.
        schedule_source_lambda (`dict[str, float]` or `str`, *optional*):
            A fixed lambda for the named sources instead of their adaptive one, e.g. `{"chat": 0.0}` or `chat=0`
            (keep NLL on chat data whatever its confidence).
        schedule_source_signal (`dict[str, str]` or `str`, *optional*):
            The signal of the named sources' schedules instead of `schedule_signal`, e.g. `new=geomean`: a source
            the probe reads as weak can wait for its hard tokens while the others follow the default. Each is read
            on its own registered ramp unless `schedule_ramp_low` / `schedule_ramp_high` are given. Formerly
            `schedule_source_statistic`.

        > Speed

        flush_denormal (`bool`, *optional*, defaults to `True`):
            On CPU, flush subnormal floats to zero for the training process (`torch.set_flush_denormal(True)`).
            Objectives that weight a token by p (`p`, `power:k`, `dft`) make the LM head's backward compute on
            subnormals, which x86 CPUs do in slow microcode: 2x the step time (benchmarks/README.md). No effect
            on GPUs, which handle subnormals in hardware.
    """

    objective: str = field(default="nll", metadata={"help": objective_help()})
    objective_schedule: str = field(
        default="none",
        metadata={
            "help": "How training moves from NLL toward `objective`: none, constant, linear, cosine, adaptive, "
            "token_gate (a lambda per token from its own confidence) or progress (NLL while fresh-batch NLL falls).",
            "choices": list(SCHEDULES),
        },
    )
    schedule_mode: str = field(
        default="blend",
        metadata={
            "help": "blend: (1 - lambda) nll + lambda objective; exponent: power:(lambda k) for a power:k objective.",
            "choices": list(MODES),
        },
    )
    objective_lambda: float = field(
        default=1.0, metadata={"help": "Lambda of the `constant` schedule, in [0, 1] (1 = the objective alone)."}
    )
    schedule_warmup_ratio: float = field(
        default=0.1, metadata={"help": "Share of optimizer steps over which linear/cosine lambda rises 0 -> 1."}
    )
    schedule_warmup_start: float = field(
        default=0.0,
        metadata={"help": "linear/cosine: share of the optimizer steps that train NLL before lambda starts to rise."},
    )
    schedule_token_gate: str = field(
        default="sum_sq",
        metadata={
            "help": "token_gate: each token's confidence that sets its own lambda on the ramp: "
            + "; ".join(f"{name}: {gate.help}" for name, gate in TOKEN_GATES.items()) + ".",
            "choices": list(TOKEN_GATES),
        },
    )
    schedule_progress_window: int = field(
        default=50, metadata={"help": "progress: optimizer steps over which the fall of the fresh-batch NLL is read."}
    )
    schedule_progress_threshold: float = field(
        default=0.05,
        metadata={"help": "progress: relative fall of the fresh-batch NLL per window at and above which lambda is 0."},
    )
    schedule_signal: str = field(
        default=DEFAULT_SIGNAL,
        metadata={
            "help": "Signal the adaptive schedule follows: "
            + "; ".join(f"{name}: {signal.help}" for name, signal in SIGNALS.items())
            + ".",
            "choices": list(SIGNALS),
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
        default=0.9, metadata={"help": "Decay of the moving average of the per-step statistic, in [0, 1)."}
    )
    schedule_monotone: bool = field(default=False, metadata={"help": "Never let lambda decrease."})
    schedule_warm_start: bool | None = field(
        default=None,
        metadata={
            "help": "Initialise the moving average from a probe of the base model on training samples before step 1 "
            "(default: on for adaptive)."
        },
    )
    schedule_warm_start_samples: int = field(
        default=256, metadata={"help": "Number of training samples the warm start measures."}
    )
    schedule_reset_on_resume: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint without schedule state by restarting the schedule (otherwise refused)."
        },
    )
    schedule_per_source: bool = field(
        default=False,
        metadata={"help": "One adaptive schedule per data source (see --source_column), applied to its own tokens."},
    )
    source_column: str = field(
        default="source",
        metadata={
            "help": "Column naming each row's source (trl-prob sft fills it from a `datasets:` mixture when absent)."
        },
    )
    schedule_sources: list[str] | None = field(
        default=None,
        metadata={"help": "The sources, in order (default: the distinct values of --source_column, sorted)."},
    )
    schedule_source_lambda: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "Fixed lambda for named sources instead of their adaptive one, e.g. 'chat=0,code=0.5'."},
    )
    schedule_source_signal: dict[str, str] | str | None = field(
        default=None,
        metadata={"help": "Signal of named sources' schedules instead of --schedule_signal, e.g. 'new=geomean'."},
    )
    # Deprecated names, still accepted (one warning line each): the values move to their new fields.
    schedule_statistic: str | None = field(
        default=None, metadata={"help": "Deprecated: use --schedule_signal.", "choices": [None, *SIGNALS]}
    )
    schedule_p_low: float | None = field(default=None, metadata={"help": "Deprecated: use --schedule_ramp_low."})
    schedule_p_high: float | None = field(default=None, metadata={"help": "Deprecated: use --schedule_ramp_high."})
    schedule_source_statistic: dict[str, str] | str | None = field(
        default=None, metadata={"help": "Deprecated: use --schedule_source_signal."}
    )
    flush_denormal: bool = field(
        default=True,
        metadata={
            "help": "On CPU, flush subnormal floats to zero while training (2x faster for p-weighted objectives). "
            "No effect on GPU."
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
        self._take_deprecated_fields()
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

    def _take_deprecated_fields(self) -> None:
        for old, new in DEPRECATED_FIELDS.items():
            value = getattr(self, old)
            if value is None:
                continue
            default = self.__dataclass_fields__[new].default
            if getattr(self, new) not in (default, value):
                raise ValueError(f"{old} (deprecated) and {new} are both set, to {value!r} and {getattr(self, new)!r}.")
            logger.warning("trl-prob: %s is deprecated; use %s (same meaning).", old, new)
            setattr(self, new, value)
            setattr(self, old, None)

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
        choice("schedule_token_gate", tuple(TOKEN_GATES))
        if isinstance(self.schedule_progress_window, bool) or not isinstance(self.schedule_progress_window, int) or (
            self.schedule_progress_window < 1
        ):
            raise ValueError(f"schedule_progress_window must be an integer >= 1, got {self.schedule_progress_window!r}.")
        if not (math.isfinite(self.schedule_progress_threshold) and self.schedule_progress_threshold > 0):
            raise ValueError(f"schedule_progress_threshold must be > 0, got {self.schedule_progress_threshold!r}.")
        signal = SIGNALS[self.schedule_signal]
        self._ramp_given = (self.schedule_ramp_low, self.schedule_ramp_high)  # before the signal's ramp fills them in
        if self.schedule_ramp_low is None:
            self.schedule_ramp_low = signal.ramp_low
        if self.schedule_ramp_high is None:
            self.schedule_ramp_high = signal.ramp_high

        def unit_interval(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}.")

        for name in ("objective_lambda", "schedule_warmup_ratio", "schedule_warmup_start", "schedule_ramp_low",
                     "schedule_ramp_high"):
            unit_interval(name)
        if self.schedule_ramp_low >= self.schedule_ramp_high:
            raise ValueError(
                f"schedule_ramp_low ({self.schedule_ramp_low}) must be below schedule_ramp_high "
                f"({self.schedule_ramp_high})."
            )
        if not (math.isfinite(self.schedule_ema_decay) and 0.0 <= self.schedule_ema_decay < 1.0):
            raise ValueError(f"schedule_ema_decay must be in [0, 1), got {self.schedule_ema_decay!r}.")
        if self.schedule_warm_start_samples < 1:
            raise ValueError(f"schedule_warm_start_samples must be >= 1, got {self.schedule_warm_start_samples}.")
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
        if self.schedule_warm_start is None:
            self.schedule_warm_start = self.objective_schedule == "adaptive"

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
        self._validate_source_fields()
        parallelism = getattr(self, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False) and self.uses_objective:
            raise ValueError(
                "Sequence parallelism (Ulysses/ALST) reduces the model's own NLL across ranks, so "
                f"objective {target.spec!r} cannot be applied. Disable sequence parallelism."
            )

    def _validate_source_fields(self) -> None:
        from .stats import MAX_SOURCES

        self.schedule_source_lambda = parse_source_lambda(self.schedule_source_lambda)
        self.schedule_source_signal = parse_source_signal(self.schedule_source_signal)
        if not self.schedule_per_source:
            for name in ("schedule_sources", "schedule_source_lambda", "schedule_source_signal"):
                if getattr(self, name):
                    raise ValueError(f"{name} is set but schedule_per_source is off: pass --schedule_per_source true.")
            return
        if self.objective_schedule != "adaptive":
            raise ValueError(
                f"schedule_per_source needs objective_schedule='adaptive' (got {self.objective_schedule!r}): only the "
                "adaptive schedule reads each source's own statistics."
            )
        if self.packing or self.eval_packing:
            which = "packing" if self.packing else "eval_packing"
            raise ValueError(
                f"schedule_per_source cannot be used with {which}: packing joins rows of different sources into one "
                "sequence. Use padding_free=True for the same padding savings, or turn packing off."
            )
        if not isinstance(self.source_column, str) or not self.source_column:
            raise ValueError(f"source_column must name a column, got {self.source_column!r}.")
        if self.schedule_sources is not None:
            sources = list(self.schedule_sources)
            bad = [s for s in sources if not isinstance(s, str) or not s]
            if bad or not sources:
                raise ValueError(f"schedule_sources must be non-empty names, got {sources!r}.")
            repeated = sorted({s for s in sources if sources.count(s) > 1})
            if repeated:
                raise ValueError(f"schedule_sources names {', '.join(repeated)} more than once.")
            if len(sources) > MAX_SOURCES:
                raise ValueError(
                    f"schedule_sources lists {len(sources)} sources; at most {MAX_SOURCES} are allowed (one statistics "
                    "row each, reduced together every step)."
                )
            check_source_names(self.schedule_source_lambda, sources, "schedule_source_lambda")
            check_source_names(self.schedule_source_signal, sources, "schedule_source_signal")

    @property
    def uses_objective(self) -> bool:
        """False only for plain NLL, where the trainer leaves TRL's loss untouched."""
        return not (get_objective(self.objective).family == "nll" and self.objective_schedule == "none")


def _source_map(value, option: str, pair: str, example: str) -> dict | None:
    """A per-source option as a dict: given as one, as JSON, or as ``pair`` items joined by commas (``example``)."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        import json

        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{option} {value!r} is not valid JSON ({exc}).") from None
        else:
            pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"{option} {value!r}: expected {pair} pairs, e.g. {example!r}.")
            value = {name.strip(): item.strip() for name, item in pairs}
    if not isinstance(value, dict):
        raise ValueError(f"{option} must map source names to values, got {value!r}.")
    return {str(name).strip(): item for name, item in value.items()}


def parse_source_lambda(value) -> dict[str, float] | None:
    """``schedule_source_lambda`` as a dict of lambdas in [0, 1]."""
    given = _source_map(value, "schedule_source_lambda", "name=lambda", "chat=0,code=0.5")
    parsed = {}
    for name, number in (given or {}).items():
        try:
            parsed[name] = float(number)
        except (TypeError, ValueError):
            parsed[name] = math.nan
        if not (math.isfinite(parsed[name]) and 0.0 <= parsed[name] <= 1.0):
            raise ValueError(f"schedule_source_lambda[{name!r}] must be a lambda in [0, 1], got {number!r}.")
    return parsed or None


def parse_source_signal(value) -> dict[str, str] | None:
    """``schedule_source_signal`` as a dict of signal names (:data:`~trl_prob.schedules.SIGNALS`)."""
    given = _source_map(value, "schedule_source_signal", "name=signal", "new=geomean")
    parsed = {name: str(signal).strip() for name, signal in (given or {}).items()}
    for name, signal in parsed.items():
        if signal not in SIGNALS:
            raise ValueError(
                f"schedule_source_signal[{name!r}] = {signal!r} is not a signal; allowed: {', '.join(SIGNALS)}."
            )
    return parsed or None


def check_source_names(given, sources: list[str], option: str) -> None:
    """An option naming sources the run does not have: one line naming them and the sources there are."""
    unknown = [name for name in given or () if name not in sources]
    if unknown:
        raise ValueError(
            f"{option} names unknown source(s) {', '.join(map(repr, unknown))}; the sources are "
            f"{', '.join(map(repr, sources))}."
        )
