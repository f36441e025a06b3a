"""Data sources of a mixed SFT run: which source each row comes from, carried from the dataset to the loss.

A row's source is a name in a column of the raw data (``ProbSFTConfig.source_column``; ``trl-prob sft`` fills it from
a ``datasets:`` mixture). Before TRL prepares the data, the names become an integer column (:data:`SOURCE_ID`) that
TRL's tokenisation keeps; :class:`SourceCollator` lifts it out of the examples into a ``[batch]`` tensor beside TRL's
batch, and the trainer takes it out again before the model sees the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .stats import MAX_SOURCES

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
