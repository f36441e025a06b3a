"""``ExperimentalSFTConfig``: [`ProbSFTConfig`] plus the research knobs, none shown to help on a real model.

``trl-prob sft --experimental ...`` parses with this class; from Python, pass it where a ``ProbSFTConfig`` goes.
Per-source schedules (one adaptive lambda per data source of a mixture), the token gate, the progress and cosine
schedules, the late linear start, the monotone hold and the denormal switch: their evidence is in
benchmarks/README.md and docs/guide.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import ProbSFTConfig
from ..schedules import SIGNALS
from .schedules import TOKEN_GATES


@dataclass
class ExperimentalSFTConfig(ProbSFTConfig):
    r"""
    [`ProbSFTConfig`] plus:

    Parameters:
        schedule_warmup_start (`float`, *optional*, defaults to `0.0`):
            `linear` / `cosine`: share of the optimizer steps that train NLL before lambda starts to rise.
        schedule_monotone (`bool`, *optional*, defaults to `False`):
            Never let lambda decrease.
        schedule_token_gate (`str`, *optional*, defaults to `"sum_sq"`):
            `token_gate`: the per-token confidence that sets each token's own lambda on the ramp: `sum_sq`
            (sum_v p_v^2) or `certainty` (1 - H / ln V).
        schedule_progress_window (`int`, *optional*, defaults to `50`), schedule_progress_threshold (`float`,
        *optional*, defaults to `0.05`):
            `progress`: lambda stays 0 while the NLL of fresh (first-epoch) batches falls by `threshold` or more
            (relative) per `window` optimizer steps, and rises to 1 as that fall stops.
        schedule_per_source (`bool`, *optional*, defaults to `False`):
            One `adaptive` schedule per data source, each applied to its own tokens (docs/guide.md).
        source_column (`str`, *optional*, defaults to `"source"`):
            Column naming each row's source (`trl-prob sft` fills it from a `datasets:` mixture when absent).
        schedule_sources (`list[str]`, *optional*):
            The sources, in order (default: the distinct values of `source_column`, sorted; at most 64).
        schedule_source_lambda (`dict[str, float]` or `str`, *optional*):
            A fixed lambda for the named sources instead of their adaptive one, e.g. `chat=0`.
        schedule_source_signal (`dict[str, str]` or `str`, *optional*):
            The signal of the named sources' schedules instead of `schedule_signal`, e.g. `new=geomean`.
        flush_denormal (`bool`, *optional*, defaults to `True`):
            On CPU, flush subnormal floats to zero while training (2x faster for p-weighted objectives; the core
            always does).
        schedule_start_objective (`str`, *optional*, defaults to `"nll"`):
            The objective a schedule's blend trains at lambda 0: loss = (1 - lambda) start + lambda `objective`. NLL
            is the paper's continuum; a confidence-aware start (`eaft:1`, `deft`, `deft_cayley`, `dft`) keeps its
            weighting while the model is weak. Not thresholded, not `asft` (its KL rides beside the head).
    """

    schedule_warmup_start: float = field(
        default=0.0,
        metadata={"help": "linear/cosine: share of the optimizer steps that train NLL before lambda starts to rise."},
    )
    schedule_monotone: bool = field(default=False, metadata={"help": "Never let lambda decrease."})
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
    schedule_start_objective: str = field(
        default="nll",
        metadata={"help": "The objective a schedule's blend trains at lambda 0: (1 - lambda) start + lambda objective "
                          "(default nll, the paper's continuum; e.g. eaft:1 keeps EAFT's weighting while the model is "
                          "weak)."},
    )
    flush_denormal: bool = field(
        default=True,
        metadata={
            "help": "On CPU, flush subnormal floats to zero while training (2x faster for p-weighted objectives). "
            "No effect on GPU."
        },
    )

    # ------------------------------------------------------------------------------------- the core's seams

    def schedule_kwargs(self, kind: type) -> dict:
        """The monotone hold for every kind, and the late start for the warm-up ramps (``linear``, ``cosine``)."""
        from ..schedules import WarmupSchedule

        extra = {"monotone": self.schedule_monotone}
        if issubclass(kind, WarmupSchedule):
            extra["start"] = self.schedule_warmup_start
        return extra

    @property
    def flush_subnormals(self) -> bool:
        return self.flush_denormal

    @property
    def start_objective(self) -> str:
        return self.schedule_start_objective

    def run_extension(self):
        """Per-source schedules (:class:`~trl_prob.experimental.sources.PerSourceExtension`) when asked for."""
        if not self.schedule_per_source:
            return None
        from .sources import PerSourceExtension

        return PerSourceExtension(self)

    def _validate_more(self) -> None:
        super()._validate_more()
        if self.schedule_token_gate not in TOKEN_GATES:
            raise ValueError(f"Unknown schedule_token_gate {self.schedule_token_gate!r}; allowed: "
                             f"{', '.join(TOKEN_GATES)}.")  # fmt: skip
        if isinstance(self.schedule_progress_window, bool) or not isinstance(self.schedule_progress_window, int) or (
            self.schedule_progress_window < 1
        ):
            raise ValueError(f"schedule_progress_window must be an integer >= 1, got {self.schedule_progress_window!r}.")
        if not (math.isfinite(self.schedule_progress_threshold) and self.schedule_progress_threshold > 0):
            raise ValueError(f"schedule_progress_threshold must be > 0, got {self.schedule_progress_threshold!r}.")
        start = self.schedule_warmup_start
        if not (isinstance(start, (int, float)) and math.isfinite(start) and 0.0 <= start <= 1.0):
            raise ValueError(f"schedule_warmup_start must be in [0, 1], got {start!r}.")
        self._validate_start_objective()
        self._validate_source_fields()

    def _validate_start_objective(self) -> None:
        from ..objectives import get_objective

        start = get_objective(self.schedule_start_objective)
        self.schedule_start_objective = start.spec
        if start.family == "nll":
            return
        given = f"schedule_start_objective={start.spec!r}"
        if self.objective_schedule == "none":
            raise ValueError(f"{given} is the objective at lambda 0 of a schedule, but objective_schedule is 'none' "
                             f"(training {self.objective!r} alone): set objective_schedule, or drop it.")  # fmt: skip
        if self.schedule_mode != "blend":
            raise ValueError(f"{given} needs schedule_mode='blend' ((1 - lambda) start + lambda objective); "
                             f"got {self.schedule_mode!r}.")  # fmt: skip
        if start.is_thresholded or start.family == "asft":
            raise ValueError(f"{given}: a thresholded objective or asft cannot be the start of a blend (their "
                             "normaliser and reference act on the whole loss); allowed: nll or an objective without a "
                             "threshold, e.g. eaft:1, deft, deft_cayley, dft, p, power:k.")  # fmt: skip
        if start.spec == get_objective(self.objective).spec:
            raise ValueError(f"{given} is the objective itself: the schedule would move nowhere.")

    def _validate_source_fields(self) -> None:
        from .sources import MAX_SOURCES

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
