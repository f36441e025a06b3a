"""Per-source schedules (``schedule_per_source``): one adaptive lambda per data source of a mixture, each read from and
applied to its own source's tokens. A research row of the lab; it reaches a run only through the core's plug-in door,
:class:`trl_prob.extension.RunExtension` (:class:`PerSourceExtension`, which ``ExperimentalSFTConfig.run_extension``
returns).

A row's source is a name in a column of the raw data (``source_column``; ``trl-prob sft`` fills it from a
``datasets:`` mixture, :func:`load_mixture`). Before TRL prepares the data, the names become an integer column
(:data:`SOURCE_ID`) that TRL's tokenisation keeps; :class:`SourceCollator` lifts it out of the examples into a
``[batch]`` tensor beside TRL's batch, and the trainer takes it out again before the model sees the batch and hands it
to the extension. Statistics are kept per source (:class:`SourceStats`, still one all-reduce per optimizer step).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoints import CheckpointError
from ..extension import BatchInfo, RunExtension
from ..stats import WIDTH, TokenProbStats, sum_over_processes

logger = logging.getLogger(__name__)

# One row of sums per data source; 64 x 216 fp64 is 110 KB, still one all-reduce per optimizer step.
MAX_SOURCES = 64


@dataclass
class SourceStats:
    """:class:`~trl_prob.stats.TokenProbStats` per data source: ``sums[s]`` holds source ``s``'s sums, and their sum is
    the step's.

    Kept as one ``[num_sources, width]`` tensor so a step, however many sources it mixes, still reduces with a single
    all-reduce.
    """

    sums: torch.Tensor

    @classmethod
    def zeros(cls, num_sources: int, device: torch.device | str = "cpu") -> SourceStats:
        return cls(torch.zeros(num_sources, WIDTH, dtype=torch.float64, device=device))

    @classmethod
    def from_rows(cls, rows: torch.Tensor, sample_source: torch.Tensor, num_sources: int) -> SourceStats:
        """Per-sample rows (:meth:`TokenProbStats.per_sample`) summed by each sample's source index."""
        out = torch.zeros(num_sources, rows.shape[-1], dtype=rows.dtype, device=rows.device)
        return cls(out.index_add_(0, sample_source.to(rows.device, torch.long), rows))

    @property
    def num_sources(self) -> int:
        return self.sums.shape[0]

    @property
    def total(self) -> TokenProbStats:
        return TokenProbStats(self.sums.sum(0))

    def __getitem__(self, source: int) -> TokenProbStats:
        return TokenProbStats(self.sums[source])

    def __add__(self, other: SourceStats) -> SourceStats:
        return SourceStats(self.sums + other.sums.to(self.sums.device))

    def all_reduce(self) -> SourceStats:
        sum_over_processes(self.sums)
        return self

    def to_host(self) -> SourceStats:
        return SourceStats(self.sums.detach().cpu())


SOURCE_ID = "trl_prob_source_id"  # integer column, then batch key: index of the row's source in the run's sources


def resolve_sources(dataset, column: str, given: Sequence[str] | None, dataset_name: str = "train") -> list[str]:
    """The run's sources: ``given`` (checked against the data), else the distinct values of ``column``, sorted.

    Raises ``ValueError`` naming the problem: no such column, a row without a source name, a name not in ``given``,
    more sources than :data:`~trl_prob.stats.MAX_SOURCES`.
    """
    names = _column_values(dataset, column, dataset_name)
    if given is not None:
        check_rows_have_sources(names, list(given), column, dataset_name)
        return list(given)
    sources = sorted(set(names))
    if len(sources) > MAX_SOURCES:
        raise ValueError(
            f"The {dataset_name} data's column {column!r} holds {len(sources)} distinct sources; at most {MAX_SOURCES} "
            "are allowed (one statistics row each). Merge sources into fewer names."
        )
    return sources


def check_rows_have_sources(names: list, sources: list[str], column: str, dataset_name: str) -> None:
    allowed = set(sources)
    for row, name in enumerate(names):
        if name not in allowed:
            raise ValueError(
                f"{dataset_name} row {row}: source {name!r} (column {column!r}) is not one of the run's sources "
                f"({', '.join(map(repr, sources))}); add it to schedule_sources."
            )


def _column_values(dataset, column: str, dataset_name: str) -> list:
    columns = getattr(dataset, "column_names", None) or []
    if column not in columns:
        raise ValueError(
            f"schedule_per_source needs each {dataset_name} row's source in column {column!r}; the {dataset_name} "
            f"data has columns {list(columns)}. Name the column with --source_column, or give the data as a "
            "`datasets:` mixture (trl-prob sft names each entry's rows)."
        )
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            f"schedule_per_source on a streaming {dataset_name} dataset: list the sources with schedule_sources "
            "(they cannot be read from data that is not loaded)."
        )
    values = dataset[column]
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{dataset_name} row {row}: source {value!r} in column {column!r} must be a non-empty name.")
    return list(values)


def with_source_ids(dataset, column: str, sources: list[str], dataset_name: str = "train"):
    """``dataset`` with the integer column :data:`SOURCE_ID` (index into ``sources``); rows from unknown sources are
    an error (for a streaming dataset, when the row is read)."""
    index = {name: i for i, name in enumerate(sources)}
    if hasattr(dataset, "__len__"):
        check_rows_have_sources(_column_values(dataset, column, dataset_name), sources, column, dataset_name)

    def add_id(row):
        name = row[column]
        if name not in index:
            raise ValueError(
                f"{dataset_name}: source {name!r} (column {column!r}) is not one of the run's sources "
                f"({', '.join(map(repr, sources))})."
            )
        return {SOURCE_ID: index[name]}

    return dataset.map(add_id)


def tag_sources(args, train, evaluation):
    """Per-source runs: the run's sources from the training data, and every raw dataset with its integer
    :data:`SOURCE_ID` column (TRL's preparation keeps it). Returns ``(sources, train, evaluation)``."""
    from .config import check_source_names

    if train is None:
        raise ValueError("schedule_per_source needs a train_dataset (the sources are read from it).")
    column = args.source_column
    sources = resolve_sources(train, column, args.schedule_sources)
    check_source_names(args.schedule_source_lambda, sources, "schedule_source_lambda")
    check_source_names(args.schedule_source_signal, sources, "schedule_source_signal")
    if isinstance(evaluation, dict):
        evaluation = {name: with_source_ids(d, column, sources, name) for name, d in evaluation.items()}
    elif evaluation is not None:
        evaluation = with_source_ids(evaluation, column, sources, "eval")
    return sources, with_source_ids(train, column, sources), evaluation


def tag_eval(evaluation, column: str, sources: list[str], prefix: str = "eval"):
    """Evaluation data passed to ``evaluate()`` itself (one dataset or a dict of them), with source ids where it has
    none yet; a dataset name (str) or None passes through."""
    if evaluation is None or isinstance(evaluation, str):
        return evaluation

    def tagged(dataset, name):
        if SOURCE_ID in (getattr(dataset, "column_names", None) or ()):
            return dataset
        return with_source_ids(dataset, column, sources, name)

    if isinstance(evaluation, dict):
        return {name: tagged(dataset, name) for name, dataset in evaluation.items()}
    return tagged(evaluation, prefix)


@dataclass
class SourceCollator:
    """Wraps TRL's collator: the examples' :data:`SOURCE_ID` values become one ``[samples]`` tensor in the batch."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [example[SOURCE_ID] for example in examples]
        batch = self.collator([{k: v for k, v in example.items() if k != SOURCE_ID} for example in examples])
        batch[SOURCE_ID] = torch.tensor(ids, dtype=torch.long)
        return batch


def token_lambdas(lambdas: torch.Tensor, sample_source: torch.Tensor, sample_index: torch.Tensor | None) -> torch.Tensor:
    """Lambda of each token: its sample's source's lambda. ``sample_index`` maps positions to samples (padding-free
    batches); without it samples are rows and the result is ``[rows, 1]``, broadcast over positions."""
    per_sample = lambdas.to(sample_source.device)[sample_source]
    if sample_index is None:
        return per_sample[:, None]
    return per_sample[sample_index]


def mixture_source_name(dataset_config) -> str:
    """A ``datasets:`` entry's source name: its config ``name``, else the last part of its path or data files."""
    import os

    if getattr(dataset_config, "name", None):
        return str(dataset_config.name)
    files = dataset_config.data_files
    path = dataset_config.path
    if files and os.path.basename(str(path).rstrip("/")) in {"json", "csv", "parquet", "text", "arrow"}:
        first = files if isinstance(files, str) else next(iter(files.values() if isinstance(files, dict) else files))
        first = first if isinstance(first, str) else first[0]
        return os.path.splitext(os.path.basename(first))[0]
    return os.path.basename(str(path).rstrip("/")) or str(path)


def load_mixture(mixture, column: str = "source"):
    """TRL's ``get_dataset(mixture)`` with each row's source in ``column``: the rows of a ``datasets:`` entry whose
    data have no such column are named after the entry (:func:`mixture_source_name`); an entry whose data carry the
    column keeps it. Same rows, in the same order, as ``get_dataset`` (``fraction`` and ``test_split_size`` included).

    Each entry is loaded by TRL's own ``get_dataset`` on its own (whole, all columns), so that it can be named before
    the entries are joined; TRL's documented ``columns``, ``fraction`` and split rules are then applied as it applies
    them. Raises ``ValueError`` for two tagged entries with the same name, and for an entry whose ``columns`` drop the
    source column its data carry (the rows would lose the sources they name).
    """
    import dataclasses

    import datasets
    from trl import DatasetMixtureConfig, get_dataset

    entries = list(mixture.datasets)
    loaded, tagged = [], {}
    for index, entry in enumerate(entries):
        whole = DatasetMixtureConfig(datasets=[dataclasses.replace(entry, columns=None, fraction=None)],
                                     streaming=mixture.streaming)  # fmt: skip
        dataset = get_dataset(whole)["train"]
        carried = column in _loaded_columns(dataset)
        if entry.columns is not None:
            if carried and column not in entry.columns:
                raise ValueError(
                    f"datasets[{index}] ({_describe(entry)}): its `columns` {list(entry.columns)} drop the source "
                    f"column {column!r} its data carry. Add {column!r} to `columns` to keep the data's own sources, or "
                    f"set source_column to a column the data lack to name every row after its entry."
                )
            dataset = dataset.select_columns(entry.columns)
        if not carried:
            name = mixture_source_name(entry)
            if name in tagged:
                first = tagged[name]
                raise ValueError(
                    f"datasets[{first}] ({_describe(entries[first])}) and datasets[{index}] ({_describe(entry)}) both "
                    f"have the source name {name!r}: give each entry a distinct `name:`, or a {column!r} column."
                )
            tagged[name] = index
        loaded.append((dataset, None if carried else mixture_source_name(entry)))

    # TRL's fraction rule (trl.get_dataset, DatasetConfig.fraction): the first round(weight * total) rows of each entry,
    # with total the largest mixture size that oversamples none.
    fractions = [entry.fraction for entry in entries]
    if any(fraction is not None for fraction in fractions):
        if any(fraction is None for fraction in fractions):
            raise ValueError("`fraction` must be set for either all datasets in the mixture or none of them.")
        if mixture.streaming:
            raise ValueError("Using a dataset `fraction` is not supported with streaming datasets.")
        weights = [fraction / sum(fractions) for fraction in fractions]
        total = min(len(dataset) / weight for (dataset, _), weight in zip(loaded, weights) if weight > 0)
        loaded = [(dataset.select(range(round(weight * total))), name) for (dataset, name), weight in zip(loaded, weights)]

    parts = [dataset if name is None else _with_source(dataset, column, name) for dataset, name in loaded]
    combined = datasets.concatenate_datasets(parts)
    if mixture.test_split_size is not None:
        return combined.train_test_split(test_size=mixture.test_split_size)
    return datasets.DatasetDict({"train": combined})


def _loaded_columns(dataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # a streaming dataset whose features are not known before it is read
    return list(first or ())


def _with_source(dataset, column: str, name: str):
    if hasattr(dataset, "__len__"):
        return dataset.add_column(column, [name] * len(dataset))
    return dataset.map(lambda _: {column: name})


def _describe(entry) -> str:
    where = [str(entry.path)]
    if entry.name:
        where.append(f"name {entry.name}")
    if entry.data_files:
        where.append(f"data_files {entry.data_files}")
    return ", ".join(where)


def first_rows_per_source(dataset, num_samples: int):
    """About ``num_samples`` rows of a dataset with :data:`SOURCE_ID`, every source in its share of the data (at least
    one row of each): the first rows of each source, in dataset order.

    The first ``num_samples`` rows of a mixture are the first entry's rows alone (TRL concatenates the entries); a
    measurement of them would leave the other sources out.
    """
    ids = dataset[SOURCE_ID]
    if num_samples >= len(ids):
        return dataset
    rows_of: dict[int, list[int]] = {}
    for row, source in enumerate(ids):
        rows_of.setdefault(source, []).append(row)
    keep = []
    for rows in rows_of.values():
        keep += rows[: max(1, round(num_samples * len(rows) / len(ids)))]
    return dataset.select(sorted(keep))


# ------------------------------------------------------------------------------------- per-source lambdas


class SourceLambdas:
    """Per-source schedules as one provider of a per-token lambda (what :class:`PerSourceExtension` gives the core's
    lambda seam).

    One schedule per source (the run's adaptive schedule; a constant one where ``schedule_source_lambda`` pins the
    source; the source's own signal where ``schedule_source_signal`` names one), each stepped on its own source's
    statistics (one row of a :class:`SourceStats`, still one all-reduce per step).
    """

    def __init__(self, args, names: Sequence[str]):
        from ..schedules import SIGNALS, AdaptiveSchedule, ConstantSchedule, build_schedule

        self.names = list(names)
        fixed = args.schedule_source_lambda or {}
        signals = args.schedule_source_signal or {}
        low_given, high_given = args.ramp_given

        def make(name: str):
            if name in fixed:
                return ConstantSchedule(constant_lambda=fixed[name], signal=args.schedule_signal,
                                        ema_decay=args.schedule_ema_decay)  # fmt: skip
            if name in signals:  # its own signal, on that signal's ramp unless the run gave one
                signal = SIGNALS[signals[name]]
                return AdaptiveSchedule(
                    ramp_low=signal.ramp_low if low_given is None else low_given,
                    ramp_high=signal.ramp_high if high_given is None else high_given,
                    signal=signal.name, ema_decay=args.schedule_ema_decay, monotone=args.schedule_monotone,
                )  # fmt: skip
            return build_schedule(args)

        self.schedules = [make(name) for name in self.names]
        self._own_signals = dict(signals)
        self._silent: set[str] = set()  # sources already reported as absent from a step
        self.device_values = torch.tensor(self.values, dtype=torch.float32)  # this step's lambda per source

    @property
    def num_sources(self) -> int:
        return len(self.names)

    @property
    def values(self) -> list[float]:
        return [schedule.value for schedule in self.schedules]

    def needs(self) -> dict[str, tuple[str, ...]]:
        from ..schedules import SIGNALS

        return {f"schedule_source_signal[{name!r}]={signal!r}": SIGNALS[signal].reads
                for name, signal in self._own_signals.items()}  # fmt: skip

    def stats_columns(self) -> frozenset[str]:
        """The statistics' column groups every source's schedule reads (its signal's)."""
        from ..stats import column_groups

        return column_groups(*(schedule.stats_columns() for schedule in self.schedules))

    def zeros(self, device):
        return SourceStats.zeros(self.num_sources, device)

    def token_lambdas(self, sample_source: torch.Tensor, sample_index: torch.Tensor | None) -> torch.Tensor:
        return token_lambdas(self.device_values, sample_source, sample_index)

    def _publish(self, device) -> None:  # one host-to-device copy per optimizer step
        self.device_values = torch.tensor(self.values, dtype=torch.float32).to(device)

    def warm_start(self, stats) -> None:
        for index, schedule in enumerate(self.schedules):
            if schedule.warm_starts and stats is not None and stats[index].num_tokens > 0:
                schedule.warm_start(stats[index])

    def begin(self, total_steps: int, device="cpu") -> None:
        for schedule in self.schedules:
            schedule.begin(total_steps)
        self._publish(device)

    def step(self, by_source, device="cpu") -> None:
        """Account one optimizer step; a source without target tokens in it keeps its running signal."""
        for index, schedule in enumerate(self.schedules):
            schedule.step(by_source[index])
        self._publish(device)

    def mean_lambda(self, by_source) -> float | None:
        """The step's tokens' mean lambda (what it trained overall); None for a step without target tokens."""
        counts = by_source.sums[:, 0]
        if counts.sum() <= 0:
            return None
        return float((counts * torch.tensor(self.values, dtype=torch.float64)).sum() / counts.sum())

    def log(self, by_source, metrics) -> None:
        """Per-source metrics of the step; a source without target tokens in it logs nothing (its schedule keeps its
        running signal and lambda), said once per source."""
        from ..schedules import SIGNALS

        for index, (name, schedule) in enumerate(zip(self.names, self.schedules)):
            stats = by_source[index]
            if stats.num_tokens == 0:
                if name not in self._silent and _is_main_process():
                    logger.warning(
                        "trl-prob: source %s had no target tokens in optimizer step %d: its signal keeps its last "
                        "value (said once per source).", name, schedule.last_step + 1
                    )
                self._silent.add(name)
                continue
            metrics[f"mean_token_prob/{name}"].append(stats.mean_p)
            metrics[f"objective_lambda/{name}"].append(schedule.value)
            own_metric = SIGNALS[schedule.signal_name].metric
            if own_metric is not None:
                metrics[f"{own_metric}/{name}"].append(schedule.signal(stats))

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: schedule.state_dict() for name, schedule in zip(self.names, self.schedules)}

    def load_state_dict(self, state: Any) -> None:
        from ..schedules import ScheduleStateError

        if not isinstance(state, dict):
            raise ScheduleStateError(f"per-source state must map source names to schedule states, got {state!r}")
        if sorted(state) != sorted(self.names):
            raise ScheduleStateError(f"per-source state holds sources {sorted(state)}, this run has {sorted(self.names)}")
        for name, schedule in zip(self.names, self.schedules):
            try:
                schedule.load_state_dict(state[name])
            except ScheduleStateError as exc:
                raise ScheduleStateError(f"source {name!r}: {exc}") from None
        self._publish(self.device_values.device)


def _is_main_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


# ------------------------------------------------------------------------------------- the plug-in


class PerSourceExtension(RunExtension):
    """``schedule_per_source`` as the core's plug-in (:class:`~trl_prob.extension.RunExtension`): the data tagged with
    each row's source, the source ids carried beside TRL's batch, one schedule per source (:class:`SourceLambdas`) at
    the core's lambda seam, statistics and metrics per source, their state in checkpoints, each source in the probe."""

    name = "schedule_per_source"
    batch_key = SOURCE_ID
    state_key = "source_schedules"  # in the schedule callback's checkpoint state, beside "schedule"

    def __init__(self, args):
        self.args = args
        self.names: list[str] | None = None  # the run's sources, in statistics-row order (read from the train data)
        self.lambdas: SourceLambdas | None = None

    # ---- data
    def load_mixture(self, mixture):
        return load_mixture(mixture, self.args.source_column)

    def prepare_datasets(self, train, evaluation):
        self.names, train, evaluation = tag_sources(self.args, train, evaluation)
        self.lambdas = SourceLambdas(self.args, self.names)
        return train, evaluation

    def prepare_eval(self, evaluation, prefix: str):
        return tag_eval(evaluation, self.args.source_column, self.names, prefix)

    def wrap_collator(self, collator):
        return SourceCollator(collator)

    def first_rows(self, dataset, num_samples: int):
        if hasattr(dataset, "__len__") and SOURCE_ID in (getattr(dataset, "column_names", None) or ()):
            return first_rows_per_source(dataset, num_samples)
        return None

    # ---- per micro-batch
    def needs(self) -> dict[str, tuple[str, ...]]:
        return self.lambdas.needs()

    def stats_columns(self) -> frozenset[str]:
        return self.lambdas.stats_columns()

    def token_lambdas(self, tokens, batch: BatchInfo) -> torch.Tensor:
        return self.lambdas.token_lambdas(batch.values, batch.sample_index)

    def group(self, rows: torch.Tensor, values: torch.Tensor) -> SourceStats:
        return SourceStats.from_rows(rows, values, len(self.names))

    def zeros(self, device) -> SourceStats:
        return SourceStats.zeros(len(self.names), device)

    # ---- per optimizer step
    def warm_start(self, groups) -> None:
        self.lambdas.warm_start(groups)

    def warm_start_lines(self) -> list[str]:
        return [f"source {name}: {schedule.signal_name} "
                + ("not measured" if schedule.p_ema is None else f"{schedule.p_ema:.4f}")
                for name, schedule in zip(self.names, self.lambdas.schedules)]  # fmt: skip

    def begin(self, total_steps: int, device="cpu") -> None:
        self.lambdas.begin(total_steps, device)

    def log_step(self, groups, metrics) -> float | None:
        trained = self.lambdas.mean_lambda(groups)  # what the step trained overall: its tokens' mean
        self.lambdas.log(groups, metrics)
        return trained

    def step(self, groups, device="cpu") -> None:
        self.lambdas.step(groups, device)

    def eval_metrics(self, groups) -> dict[str, float]:
        return {f"mean_token_prob/{name}": groups[index].mean_p
                for index, name in enumerate(self.names) if groups[index].num_tokens}  # fmt: skip

    # ---- checkpoints
    def state_dict(self) -> dict[str, dict[str, Any]]:
        return self.lambdas.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.lambdas.load_state_dict(state)

    def saved_state(self, checkpoint: str, state: Any, args) -> dict | None:
        """The per-source schedule state ``checkpoint`` holds, checked against this run's sources; ``None`` where the
        run may start the per-source schedules afresh."""
        from ..checkpoints import SCHEDULE_CALLBACK, TRAINER_STATE_FILE
        from ..schedules import ScheduleStateError

        if state is None:
            if args.schedule_reset_on_resume:
                return None
            raise CheckpointError(
                f"checkpoint {checkpoint} has no per-source schedule state ({TRAINER_STATE_FILE} stateful_callbacks."
                f"{SCHEDULE_CALLBACK}.{self.state_key}): it was written by a run without schedule_per_source. Pass "
                "--schedule_reset_on_resume to start each source's schedule afresh."
            )
        try:
            SourceLambdas(args, self.names).load_state_dict(state)
        except ScheduleStateError as exc:
            raise CheckpointError(
                f"checkpoint {checkpoint}: bad per-source schedule state in {TRAINER_STATE_FILE}: {exc}."
            ) from None
        return state

    # ---- probe
    def probe_entries(self, measurement, dataset, args) -> dict[str, dict]:
        """Each source's place on the continuum (:func:`trl_prob.probe.source_report`), with how many of its samples
        were measured, the lambda its schedule would train step 1 with, and the signal and ramp it reads."""
        from ..probe import source_report
        from ..schedules import AdaptiveSchedule

        names = self.names
        counts = [None] * len(names)
        if hasattr(dataset, "__len__"):
            counts = torch.bincount(torch.as_tensor(dataset[SOURCE_ID], dtype=torch.long), minlength=len(names)).tolist()
        schedules = SourceLambdas(args, names)  # fresh, warm-started from this measurement
        schedules.warm_start(measurement.groups)
        schedules.begin(1)
        fixed = args.schedule_source_lambda or {}
        entries = {}
        for index, (name, schedule) in enumerate(zip(names, schedules.schedules)):
            adaptive = isinstance(schedule, AdaptiveSchedule)
            low = schedule.ramp_low if adaptive else args.schedule_ramp_low
            high = schedule.ramp_high if adaptive else args.schedule_ramp_high
            entries[name] = source_report(
                measurement.groups[index], args.objective, low, high, schedule.signal_name, num_samples=counts[index],
                start_lambda=(schedule.value, name in fixed),
            )  # fmt: skip
        return entries
