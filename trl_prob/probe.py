"""Measure where a model stands on the paper's capability continuum: target-token probability statistics.

The measurement itself is :func:`trl_prob.measure.measure`; this module places it and reports it.

- :func:`check_probe_inputs`: clear errors for inputs TRL would reject obscurely; call it before building the trainer.
- :func:`run_probe`: measure a built ``ProbSFTTrainer``'s training data, place the model on the continuum, recommend
  ``--objective`` / ``--objective_schedule`` and write ``probe.json`` and ``probe_histogram.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from .measure import Measurement
from .schedules import DEFAULT_RAMP, DEFAULT_SIGNAL
from .stats import CONFIDENT_P, HISTOGRAM_BINS, TokenProbStats

logger = logging.getLogger(__name__)

PROBE_JSON = "probe.json"
PROBE_HISTOGRAM_PNG = "probe_histogram.png"

# Mean target-token probability of the base models in "Beyond Log Likelihood" (their Eq. 5), per end of the continuum.
REFERENCE_BANDS: dict[str, tuple[float, float]] = {
    "model-weak": (0.01, 0.07),  # figfont puzzles (reasoning-gym)
    "model-intermediate": (0.50, 0.59),  # medical reasoning (m23k)
    "model-strong": (0.76, 0.81),  # math (NuminaMath-CoT) on math-capable 1.5B-8B models
}
REFERENCE_EXAMPLES = {
    "model-weak": "figfont puzzles",
    "model-intermediate": "medical reasoning",
    "model-strong": "math",
}
# Share of training tokens with p > 0.55 at the strong end.
STRONG_SHARE_CONFIDENT = (0.728, 0.812)
# Below this the model sits at the paper's weak end itself, where NLL wins by far: plain NLL is recommended.
WEAK_END_P = 0.10
NOISE_NOTE = (
    "With label noise the measured mean is capped near (1 - noise) x the probability on clean tokens, so noisy "
    "data reads lower than the paper's clean-data bands; that is why the adaptive schedule ramps from 0.30 to 0.55 "
    "by default (see ProbSFTConfig.schedule_ramp_low / schedule_ramp_high)."
)
# Below this share of rows completed exactly (teacher-forced), a model is not "strong" on the task, whatever its mean p.
FORMAT_EXACT = 0.05
TABLE_BINS = 10  # histogram in the printed table and in probe.json
PLOT_BINS = 50  # histogram in probe_histogram.png (also in probe.json)


# ------------------------------------------------------------------------------------------ the continuum


def place_on_continuum(mean_p: float, ramp_low: float = DEFAULT_RAMP[0], ramp_high: float = DEFAULT_RAMP[1]) -> str:
    """``model-weak`` below ``ramp_low``, ``model-strong`` at or above ``ramp_high``, ``model-intermediate`` between.

    The placement reads the paper's proxy, mean target p, on the default ramp (whatever signal the schedule follows:
    the recommendation reads that one). The cut-offs: 0.30 is about midway between the paper's weak (<= 0.07) and
    intermediate (>= 0.50) bands, 0.55 is the paper's own confidence cut-off. ``unknown`` without tokens (NaN).
    """
    if math.isnan(mean_p):
        return "unknown"
    if mean_p >= ramp_high:
        return "model-strong"
    return "model-intermediate" if mean_p >= ramp_low else "model-weak"


def place_by_signal(stats: TokenProbStats, signal: str = DEFAULT_SIGNAL, ramp_low: float | None = None,
                    ramp_high: float | None = None) -> str:
    """Where the model stands, read as the adaptive schedule reads it: ``signal`` on its ramp (default: the signal's
    own), so the probe's placement and the schedule's warm-start lambda agree (weak: lambda 0, strong: lambda 1).
    With the default ``sequence_top1`` a model that writes none of the completions exactly is weak, however high its
    mean p. Falls back to the paper's mean p on the default ramp where the head did not report what the signal reads."""
    from .schedules import SIGNALS

    spec = SIGNALS[signal]
    value = spec.read(stats)
    if math.isnan(value):
        return place_on_continuum(stats.mean_p)
    low = spec.ramp_low if ramp_low is None else ramp_low
    high = spec.ramp_high if ramp_high is None else ramp_high
    return place_on_continuum(value, low, high)


def nearest_reference(mean_p: float) -> str:
    """The paper's reference band closest to ``mean_p`` (``model-weak``, ``model-intermediate`` or ``model-strong``)."""

    def distance(band: tuple[float, float]) -> float:
        low, high = band
        return max(low - mean_p, 0.0, mean_p - high)

    if math.isnan(mean_p):
        return "unknown"
    return min(REFERENCE_BANDS, key=lambda name: distance(REFERENCE_BANDS[name]))


def describe_position(mean_p: float) -> str:
    """Where ``mean_p`` falls relative to the paper's bands, e.g. ``"inside the intermediate band (0.50-0.59)"``."""
    if math.isnan(mean_p):
        return "no target tokens measured"
    names = list(REFERENCE_BANDS)
    for name in names:
        low, high = REFERENCE_BANDS[name]
        if low <= mean_p <= high:
            return f"inside the paper's {_short(name)} band ({_band(name)})"
    if mean_p < REFERENCE_BANDS[names[0]][0]:
        return f"below the paper's weak band ({_band(names[0])})"
    if mean_p > REFERENCE_BANDS[names[-1]][1]:
        return f"above the paper's strong band ({_band(names[-1])})"
    for lower, upper in zip(names, names[1:]):
        if REFERENCE_BANDS[lower][1] < mean_p < REFERENCE_BANDS[upper][0]:
            return f"between the paper's {_short(lower)} ({_band(lower)}) and {_short(upper)} ({_band(upper)}) bands"
    raise AssertionError("unreachable")  # the bands are ordered and cover the gaps above


def recommend(
    mean_p: float,
    objective: str | None = None,
    ramp_low: float = DEFAULT_RAMP[0],
    ramp_high: float = DEFAULT_RAMP[1],
    signal: str = DEFAULT_SIGNAL,
    signal_value: float | None = None,
    exact: float = float("nan"),
) -> tuple[str, str, str]:
    """``(objective, objective_schedule, reason)`` for a model whose mean target probability is ``mean_p``.

    ``objective`` is the prior-leaning target the user configured (``p`` unless its family leans on the prior in the
    objective registry). The rule follows the paper: NLL at its weak end (mean p below 0.10), the prior-leaning
    objective where the model is confident, and in between the adaptive schedule. Confidence is read as the adaptive
    schedule reads it (``signal``, whose value is ``signal_value``, on the ramp ``ramp_low`` -> ``ramp_high``), so the probe's
    advice before training and the schedule's lambda during it agree.

    One check of ours before the paper's rule: a model above the weak end by mean p that completes under
    ``FORMAT_EXACT`` of the measured rows exactly (``exact``, every target token its first choice) is treated as weak,
    because mean p misreads it (on SmolLM2 where the answer format was new, the rule's ``p`` scored 0.022 and 0.010
    exact match against NLL's 0.398 and 0.085: benchmarks/README.md).
    """
    from .objectives import get_objective
    from .schedules import adaptive_lambda

    target = get_objective(objective) if objective else None
    spec = target.spec if target is not None and target.leans_on_prior else "p"
    value = mean_p if signal_value is None else signal_value
    named = "mean" if signal == "mean" else f"{signal} signal"
    if math.isnan(mean_p):
        return "nll", "none", "no target tokens were measured: nothing to place on the continuum; NLL is the default."
    if mean_p < WEAK_END_P:
        return "nll", "none", (
            f"at the paper's weak end ({_band('model-weak')}), where NLL wins by far (figfont exact match 35.2 vs "
            "0.0 for 1 - p): prior-leaning objectives barely train tokens the model cannot predict yet."
        )
    if completes_almost_nothing(exact):
        return "nll", "none", (
            f"mean p reads it above the weak end, yet it completes only {exact:.1%} of the measured rows exactly: the "
            "task's format is new to it and prior-leaning objectives barely train the tokens it gets wrong (trl-prob's "
            "check, not the paper's: on SmolLM2 there, p scored 0.022 against NLL's 0.398)."
        )
    if math.isnan(value) or value < ramp_low:
        return spec, "adaptive", (
            f"weak on this data: adaptive trains pure NLL (the paper's choice here) until the running {named} passes "
            f"{ramp_low:.2f}, then moves toward {spec} as the model becomes confident."
        )
    if value < ramp_high:
        lam = adaptive_lambda(value, ramp_low, ramp_high)
        return spec, "adaptive", (
            f"between the ends, where the paper finds no single winner: adaptive starts at lambda {lam:.2f} "
            f"(share of {spec}) and follows the model's confidence, reaching {spec} alone at {ramp_high:.2f}."
        )
    return spec, "none", (
        f"confident on this data ({named} >= {ramp_high:.2f}): at the strong end prior-leaning objectives beat NLL "
        "(math: 1 - p 32.75 vs NLL 17.00 on Qwen2.5-Math-1.5B)."
    )


def completes_almost_nothing(exact: float) -> bool:
    """Whether a model completes under ``FORMAT_EXACT`` of the measured rows exactly (``exact``; NaN: not measured),
    the sign that mean p misreads it: the task's format is new to it."""
    return not math.isnan(exact) and exact < FORMAT_EXACT


def capability_note(continuum: str, exact: float) -> str:
    """The probe's note: the label-noise caveat, preceded, where the mean p places the model at or above the
    intermediate band while it completes almost no row exactly, by the warning that mean p misreads it."""
    if continuum in ("model-strong", "model-intermediate") and completes_almost_nothing(exact):
        return (
            f"Mean p reads this model as {continuum.removeprefix('model-')}, yet it completes only {exact:.1%} of the "
            "measured rows exactly (every target token its first choice): the mean is carried by easy tokens, and the "
            "task's format is new to it (SmolLM2 on the quickstart's equations: mean p 0.61, exact 0). Treat it as "
            "weak on this task: prior-leaning objectives barely train the tokens it gets wrong. " + NOISE_NOTE
        )
    return NOISE_NOTE


def _short(name: str) -> str:
    return name.removeprefix("model-")


def _band(name: str) -> str:
    low, high = REFERENCE_BANDS[name]
    return f"{low:.2f}-{high:.2f}"


# ------------------------------------------------------------------------------------------------ the report


@dataclass
class ProbeReport:
    """What ``trl-prob probe`` found: the target-token probability statistics and what they recommend.

    Every field is written to ``probe.json``; the printed table shows the fields listed in :meth:`table_rows`.
    """

    model: str
    num_samples: int
    num_tokens: int
    mean_p: float
    median_p: float
    share_confident: float
    nll: float
    continuum: str  # by the schedule's signal on its ramp (place_by_signal): agrees with the warm-start lambda
    position: str
    nearest_reference: str
    recommended_objective: str
    recommended_schedule: str
    recommended_flags: str
    reason: str
    note: str
    auto: str = field(default_factory=lambda: __import__("trl_prob.auto", fromlist=["describe"]).describe())
    max_length: int | None = None
    num_samples_without_targets: int = 0
    num_samples_dropped: int | None = None
    confident_p: float = CONFIDENT_P
    schedule_ramp_low: float = DEFAULT_RAMP[0]
    schedule_ramp_high: float = DEFAULT_RAMP[1]
    schedule_signal: str = DEFAULT_SIGNAL
    schedule_signal_value: float = float("nan")
    continuum_mean_p: str = "unknown"  # the paper's proxy: mean p on the default ramp (kept for comparison)
    signals: dict[str, float] = field(default_factory=dict)  # every registered signal, for comparison
    share_above_0_9: float = float("nan")
    reference_bands: dict[str, list[float]] = field(default_factory=lambda: {k: list(v) for k, v in REFERENCE_BANDS.items()})
    reference_strong_share_confident: list[float] = field(default_factory=lambda: list(STRONG_SHARE_CONFIDENT))
    histogram: dict[str, list[float]] = field(default_factory=dict)
    histogram_fine: dict[str, list[float]] = field(default_factory=dict)
    # a run extension's entries, by name (trl_prob.experimental's per-source schedules: each source's place on the
    # continuum, a :func:`source_report`)
    sources: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_measurement(
        cls,
        measurement: Measurement,
        *,
        model: str = "model",
        objective: str | None = None,
        ramp_low: float = DEFAULT_RAMP[0],
        ramp_high: float = DEFAULT_RAMP[1],
        signal: str = DEFAULT_SIGNAL,
        max_length: int | None = None,
        num_samples_dropped: int | None = None,
        sources: dict[str, dict] | None = None,
    ) -> ProbeReport:
        """The report of ``measurement``; ``sources``: a run extension's entries, by name (each a
        :func:`source_report`; :meth:`trl_prob.extension.RunExtension.probe_entries`)."""
        from .schedules import SIGNALS

        stats = measurement.stats
        mean_p = stats.mean_p
        signals = {name: s.read(stats) for name, s in SIGNALS.items()}
        objective_spec, schedule, reason = recommend(mean_p, objective, ramp_low, ramp_high, signal, signals[signal],
                                                     stats.sequence_top1_share)
        flags = f"--objective {objective_spec} --objective_schedule {schedule}"
        return cls(
            model=model,
            num_samples=measurement.num_samples,
            num_tokens=stats.num_tokens,
            mean_p=mean_p,
            median_p=stats.median_p,
            share_confident=stats.share_confident,
            nll=stats.nll,
            continuum=place_by_signal(stats, signal, ramp_low, ramp_high),
            continuum_mean_p=place_on_continuum(mean_p),
            position=describe_position(mean_p),
            nearest_reference=nearest_reference(mean_p),
            recommended_objective=objective_spec,
            recommended_schedule=schedule,
            recommended_flags=flags,
            reason=reason,
            note=capability_note(place_on_continuum(mean_p), stats.sequence_top1_share),
            max_length=max_length,
            num_samples_without_targets=measurement.num_samples_without_targets,
            num_samples_dropped=num_samples_dropped,
            schedule_ramp_low=ramp_low,
            schedule_ramp_high=ramp_high,
            schedule_signal=signal,
            schedule_signal_value=signals[signal],
            signals=signals,
            share_above_0_9=stats.share_above(0.9),
            histogram=_histogram(stats, TABLE_BINS),
            histogram_fine=_histogram(stats, PLOT_BINS),
            sources=dict(sources or {}),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def table_rows(self) -> list[tuple[str, str, str]]:
        """``(label, probe.json key, shown value)`` of every line of the printed table; sections split at ``""``."""
        bands = " | ".join(f"{_short(n)} {low:.2f}-{high:.2f}" for n, (low, high) in self.reference_bands.items())
        share_low, share_high = self.reference_strong_share_confident
        rows = [
            ("model", "model", self.model),
            ("samples", "num_samples", f"{self.num_samples:,}"),
        ]
        if self.num_samples_without_targets:
            rows.append(("samples without targets", "num_samples_without_targets", f"{self.num_samples_without_targets:,}"))
        if self.num_samples_dropped:
            rows.append(
                ("dropped by truncation", "num_samples_dropped", f"{self.num_samples_dropped:,} (max_length={self.max_length})")
            )
        rows += [
            ("target tokens", "num_tokens", f"{self.num_tokens:,}"),
            ("mean target probability", "mean_p", f"{self.mean_p:.4f}   (the paper's capability proxy, Eq. 5)"),
            ("median target probability", "median_p", f"{self.median_p:.4f}"),
            (f"share of tokens p > {self.confident_p:.2f}", "share_confident", f"{self.share_confident:.1%}"),
            ("mean NLL (nats/token)", "nll", f"{self.nll:.4f}"),
            ("share of tokens p >= 0.90", "share_above_0_9", f"{self.share_above_0_9:.1%}"),
            (
                "schedule signal",
                "schedule_signal_value",
                f"{self.schedule_signal} = {self.schedule_signal_value:.4f}   (adaptive ramp "
                f"{self.schedule_ramp_low:.2f} -> {self.schedule_ramp_high:.2f})",
            ),
            ("other signals", "signals", ", ".join(  # a signal this run's head outputs cannot give is left out
                f"{name} {value:.3f}" for name, value in self.signals.items()
                if name != self.schedule_signal and value is not None and not math.isnan(value))),
            ("", "", ""),
            ("continuum", "continuum", f"{self.continuum}   (by the schedule signal {self.schedule_signal} on its "
                                       "ramp: what the model can do on the task)"),
            ("continuum (paper's mean p)", "continuum_mean_p", self.continuum_mean_p),
            ("position (mean p)", "position", self.position),
            ("paper reference (mean p)", "reference_bands", bands),
            (
                f"paper: share p > {self.confident_p:.2f}",
                "reference_strong_share_confident",
                f"{share_low:.1%}-{share_high:.1%} at the strong end",
            ),
            ("note", "note", self.note),
            ("", "", ""),
            ("recommended", "auto", self.auto),
            ("the paper's rule here", "recommended_flags", self.recommended_flags),
            ("why (paper)", "reason", self.reason),
            ("", "", ""),
        ]
        if self.sources:
            rows.append(("per source", "sources", f"{len(self.sources)} sources, each on its own adaptive schedule "
                         "(schedule_per_source); alone, each would be recommended:"))  # fmt: skip
            rows += [(f"  {name}", "sources", _source_line(entry, self.schedule_signal))
                     for name, entry in self.sources.items()]  # fmt: skip
            rows.append(("", "", ""))
        rows.append(("histogram of p", "histogram", "share of target tokens per bin"))
        return rows

    def format_table(self) -> str:
        """The report as the text table ``trl-prob probe`` prints."""
        rows = self.table_rows()
        width = max(len(label) for label, _, _ in rows)
        line = "-" * 100
        out = [line, "trl-prob probe: where the model stands on the capability continuum", line]
        for label, _, value in rows:
            out.append(line if not label else f"{label:<{width}}  " + _wrap(value, width + 2))
        out += _histogram_lines(self.histogram, indent=width + 2)
        out.append(line)
        return "\n".join(out)

    def save(self, output_dir: str) -> tuple[str, str]:
        """Write ``probe.json`` and ``probe_histogram.png`` to ``output_dir``; returns their paths."""
        from .plots import plot_probe_histogram

        os.makedirs(output_dir, exist_ok=True)
        json_path = os.path.join(output_dir, PROBE_JSON)
        with open(json_path, "w") as f:
            json.dump(_finite(self.to_dict()), f, indent=2)
            f.write("\n")
        png_path = plot_probe_histogram(self, os.path.join(output_dir, PROBE_HISTOGRAM_PNG))
        return json_path, png_path


def source_report(
    stats: TokenProbStats,
    objective: str | None,
    ramp_low: float,
    ramp_high: float,
    signal: str,
    num_samples: int | None = None,
    start_lambda: tuple[float, bool] | None = None,
) -> dict:
    """One entry of ``probe.json``'s ``sources`` (a part of the data, e.g. one source of a mixture): its statistics,
    place on the continuum, schedule signal and what :func:`recommend` advises for it alone; ``start_lambda``:
    ``(lambda, fixed)`` its schedule starts the run with (``fixed``: pinned, not adaptive)."""
    from .schedules import SIGNALS

    mean_p = stats.mean_p
    value = SIGNALS[signal].read(stats)
    objective_spec, schedule, reason = recommend(mean_p, objective, ramp_low, ramp_high, signal, value,
                                                 stats.sequence_top1_share)
    return {
        "num_samples": num_samples,
        "num_tokens": stats.num_tokens,
        "mean_p": mean_p,
        "median_p": stats.median_p,
        "share_confident": stats.share_confident,
        "nll": stats.nll,
        "schedule_signal": signal,
        "schedule_signal_value": value,
        "continuum": place_by_signal(stats, signal, ramp_low, ramp_high),
        "continuum_mean_p": place_on_continuum(mean_p),
        "position": describe_position(mean_p),
        "start_lambda": None if start_lambda is None else start_lambda[0],
        "lambda_fixed": None if start_lambda is None else start_lambda[1],
        "recommended_objective": objective_spec,
        "recommended_schedule": schedule,
        "recommended_flags": f"--objective {objective_spec} --objective_schedule {schedule}",
        "reason": reason,
    }


def _source_line(entry: dict, signal: str) -> str:
    def number(value, spec: str) -> str:  # NaN became null in probe.json
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    measured = f"{entry['num_tokens']:,} tokens"
    if entry.get("num_samples") is not None:
        measured = f"{entry['num_samples']:,} samples, {measured}"
    start = ""
    if entry.get("start_lambda") is not None:
        start = f"; lambda {number(entry['start_lambda'], '.2f')} at step 1" + (
            " (fixed by schedule_source_lambda)" if entry.get("lambda_fixed") else ""
        )
    signal = entry.get("schedule_signal", signal)
    read = "" if signal == "mean" else f", {signal} {number(entry['schedule_signal_value'], '.4f')}"
    return (
        f"{entry['continuum']}: mean p {number(entry['mean_p'], '.4f')}{read} ({measured}){start}; "
        f"{entry['recommended_flags']}"
    )


def _histogram(stats: TokenProbStats, bins: int) -> dict[str, list[float]]:
    counts = stats.histogram.cpu().view(bins, HISTOGRAM_BINS // bins).sum(-1)
    edges = torch.linspace(0.0, 1.0, bins + 1)
    return {"bin_edges": [round(e, 6) for e in edges.tolist()], "token_counts": [int(c) for c in counts.tolist()]}


def _histogram_lines(histogram: dict[str, list[float]], indent: int = 2, bar_width: int = 40) -> list[str]:
    counts, edges = histogram["token_counts"], histogram["bin_edges"]
    total = sum(counts) or 1
    top = max(counts) or 1
    lines = []
    for i, count in enumerate(counts):
        share = count / total
        bar = "#" * round(bar_width * count / top)
        lines.append(f"{'':<{indent}}{edges[i]:.1f}-{edges[i + 1]:.1f}  {share:6.1%}  {bar}".rstrip())
    return lines


def _wrap(text: str, indent: int, width: int = 100) -> str:
    import textwrap

    return ("\n" + " " * indent).join(textwrap.wrap(text, width=width - indent))


def _finite(value):
    # JSON has no NaN: statistics of zero tokens become null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ validation


class ProbeInputError(ValueError):
    """The data or model cannot be probed; the message names the cause and the fix."""


def check_probe_inputs(dataset, processing_class=None, args=None, dataset_name: str = "train") -> None:
    """Fail early, with the cause and a fix, on inputs TRL would reject obscurely or that leave nothing to measure.

    Call it before building the trainer (TRL raises a bare ``StopIteration`` on an empty dataset, and a generic
    Jinja error for conversational data without a chat template).

    Args:
        dataset: the raw dataset the trainer will be built with (``datasets.Dataset`` / ``IterableDataset``).
        processing_class: the tokenizer or processor the trainer will use.
        args: the ``ProbSFTConfig`` (or ``SFTConfig``): ``chat_template_path`` counts as a chat template.
    """
    from trl.data_utils import is_conversational, is_conversational_from_value

    if dataset is None:
        raise ProbeInputError(f"No {dataset_name} dataset to probe.")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ProbeInputError(f"The {dataset_name} dataset is empty: there are no samples to probe.")
    try:
        first = next(iter(dataset))
    except StopIteration:
        raise ProbeInputError(f"The {dataset_name} dataset is empty: there are no samples to probe.") from None
    conversational = is_conversational(first) or is_conversational_from_value(first)
    if not conversational or processing_class is None or getattr(args, "dataset_kwargs", None) and args.dataset_kwargs.get(
        "skip_prepare_dataset"
    ):
        return
    has_template = getattr(processing_class, "chat_template", None) or getattr(args, "chat_template_path", None)
    if not has_template:
        name = getattr(processing_class, "name_or_path", "") or type(processing_class).__name__
        keys = ", ".join(sorted(first))
        raise ProbeInputError(
            f"The {dataset_name} dataset is conversational (columns {keys} hold lists of role/content messages), but "
            f"the tokenizer of {name!r} has no chat template, so TRL cannot render the conversations. Pass "
            "--chat_template_path (a .jinja file, or a model or tokenizer whose template to clone), use a model "
            "whose tokenizer has a chat template (usually the instruct variant), or give the data as plain "
            "prompt/completion strings."
        )


def _check_measured(measurement: Measurement, max_length: int | None, dataset_name: str) -> None:
    if measurement.num_samples == 0:
        raise ProbeInputError(f"The {dataset_name} dataset is empty: there are no samples to probe.")
    if measurement.stats.num_tokens == 0:
        truncation = f" after truncation to max_length={max_length}" if max_length is not None else ""
        raise ProbeInputError(
            f"None of the {measurement.num_samples:,} probed samples has a trainable token{truncation}: every label "
            "is -100. Raise --max_length (or shorten the prompts), or check the completion / assistant "
            "masks (completion_only_loss, assistant_only_loss)."
        )


# ------------------------------------------------------------------------------------------------- run_probe


def run_probe(
    trainer,
    num_samples: int | None,
    output_dir: str | None,
    batch_size: int | None = None,
    *,
    source_dataset=None,
    progress: bool = True,
) -> ProbeReport:
    """Probe ``trainer``'s training data: where its model stands on the capability continuum, and what to train.

    The tokens are exactly those training uses (TRL's prepared dataset, collator and masks, via the trainer's eval
    dataloader), measured through the fused log-prob head, split over processes and reduced. Rank 0 prints the
    table and, with ``output_dir``, writes ``probe.json`` and ``probe_histogram.png`` there. A per-source trainer's
    report also holds the run extension's entries (per-source schedules: each source's place, ``ProbeReport.sources``).

    Args:
        trainer: a built ``ProbSFTTrainer`` (or any ``SFTTrainer`` with ``ProbObjectiveMixin``).
        num_samples: probe the first ``num_samples`` samples of the (prepared) training set; ``None`` for all. In a
            per-source run (``schedule_per_source``), the first rows of each source, in its share of the data.
        output_dir: where to write the report files; ``None`` to only print.
        batch_size: per-device batch size of the probe (overrides ``per_device_eval_batch_size`` while it runs).
        source_dataset: the raw dataset the trainer was built from, if at hand: TRL silently drops samples that
            truncation to ``max_length`` leaves without a target token, and this lets the report count them.
        progress: show a progress bar (rank 0).
    """
    if num_samples is not None and num_samples < 1:
        raise ProbeInputError(f"num_samples must be >= 1 (or None for the whole dataset), got {num_samples}.")
    if batch_size is not None and batch_size < 1:
        raise ProbeInputError(f"batch_size must be >= 1, got {batch_size}.")
    args = trainer.args
    max_length = getattr(args, "max_length", None)
    dataset = trainer.train_dataset
    dropped = _count_dropped(source_dataset, dataset, args)
    if dataset is None or (hasattr(dataset, "__len__") and len(dataset) == 0):
        _raise_empty(source_dataset, dropped, max_length)
    extension = getattr(trainer, "extension", None)  # ProbObjectiveMixin's; None for another SFTTrainer
    if num_samples is not None:
        dataset = _first_samples(dataset, num_samples, extension)

    measurement = _measure_with_batch_size(trainer, dataset, batch_size, progress)
    _check_measured(measurement, max_length, "train")
    report = ProbeReport.from_measurement(
        measurement,
        model=_model_name(trainer.model),
        objective=getattr(args, "objective", None),
        ramp_low=getattr(args, "schedule_ramp_low", DEFAULT_RAMP[0]),
        ramp_high=getattr(args, "schedule_ramp_high", DEFAULT_RAMP[1]),
        signal=getattr(args, "schedule_signal", DEFAULT_SIGNAL),
        max_length=max_length,
        num_samples_dropped=dropped,
        sources=extension.probe_entries(measurement, dataset, args) if extension is not None else None,
    )
    if measurement.num_samples_without_targets and trainer.is_world_process_zero():
        logger.warning(
            "%d of %d probed samples have no trainable token (all labels -100%s); they add nothing to the statistics.",
            measurement.num_samples_without_targets,
            measurement.num_samples,
            f" after truncation to max_length={max_length}" if max_length is not None else "",
        )
    if trainer.is_world_process_zero():
        print(report.format_table(), flush=True)
        if output_dir is not None:
            json_path, png_path = report.save(output_dir)
            print(f"wrote {json_path} and {png_path}", flush=True)
    return report


def _first_samples(dataset, num_samples: int, extension=None):
    if not hasattr(dataset, "__len__"):
        return dataset.take(num_samples)
    chosen = extension.first_rows(dataset, num_samples) if extension is not None else None  # e.g. each source's share
    if chosen is not None:
        return chosen
    return dataset.select(range(min(num_samples, len(dataset))))


def _measure_with_batch_size(trainer, dataset, batch_size: int | None, progress: bool) -> Measurement:
    args = trainer.args
    previous = args.per_device_eval_batch_size
    if batch_size is not None:
        args.per_device_eval_batch_size = batch_size
    try:
        return trainer.measure_dataset(dataset, progress=progress)
    finally:
        args.per_device_eval_batch_size = previous


def _count_dropped(source_dataset, prepared, args) -> int | None:
    """Samples TRL's preparation dropped (left without a target by truncation), when both sizes are known."""
    if source_dataset is None or prepared is None or getattr(args, "packing", False):
        return None
    if not (hasattr(source_dataset, "__len__") and hasattr(prepared, "__len__")):
        return None
    return max(0, len(source_dataset) - len(prepared))


def _raise_empty(source_dataset, dropped: int | None, max_length: int | None) -> None:
    if dropped:
        raise ProbeInputError(
            f"All {dropped:,} samples have no trainable token after truncation to max_length={max_length} (TRL drops "
            "such samples): the prompt fills max_length. Raise --max_length or shorten the prompts (TRL keeps the start "
            "of each sample: keep_end truncation is deprecated)."
        )
    if source_dataset is not None and hasattr(source_dataset, "__len__") and len(source_dataset) == 0:
        raise ProbeInputError("The train dataset is empty: there are no samples to probe.")
    truncation = (
        f", or every sample was left without a trainable token by truncation to max_length={max_length} (TRL drops such samples)"
        if max_length is not None
        else ""
    )
    raise ProbeInputError(f"The trainer's train dataset is empty after TRL's preparation: the dataset is empty{truncation}.")


def _model_name(model) -> str:
    from accelerate.utils import is_peft_model

    base = model.get_base_model() if is_peft_model(model) else model
    name = getattr(getattr(base, "config", None), "name_or_path", "") or type(base).__name__
    return str(name)
