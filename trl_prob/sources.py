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
