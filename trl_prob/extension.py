"""The core's one door for a plug-in to a run: :class:`RunExtension`.

A config brings at most one (:meth:`trl_prob.config.ProbSFTConfig.run_extension`, ``None`` in the core); the trainer,
the objective hook, the measurement, the checkpoints, the probe and the command line's data loading call its methods
and read nothing else of it. The core never imports a plug-in: ``trl_prob.experimental``'s per-source schedules
(:class:`trl_prob.experimental.sources.PerSourceExtension`) reach the run only through this class.

What a plug-in may add to a run:

- one integer per sample carried beside TRL's batch (:attr:`RunExtension.batch_key`): a column its
  :meth:`~RunExtension.prepare_datasets` adds before TRL prepares the data, kept through TRL's column pruning, lifted
  into each batch by its :meth:`~RunExtension.wrap_collator`, taken out again by the trainer before the model sees the
  batch and handed to the plug-in with each micro-batch (:class:`BatchInfo`);
- each token's lambda (:meth:`~RunExtension.token_lambdas`: the same seam as the run's
  :meth:`trl_prob.schedules.Schedule.token_lambdas`) and statistics of its own, grouped from each micro-batch's
  per-sample rows (:meth:`~RunExtension.group`) and all-reduced with the step's (one all-reduce per step);
- its own schedules, stepped, logged, saved in the schedule callback's checkpoint state (:attr:`state_key`) and
  restored, and entries of its own in the probe's report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BatchInfo:
    """What the lambda seam knows of a micro-batch besides its head outputs: which sample each position belongs to
    (``None``: samples are the rows) and the plug-in's per-sample values (its :attr:`RunExtension.batch_key`)."""

    sample_index: torch.Tensor | None = None
    values: torch.Tensor | None = None


class RunExtension:
    """A plug-in to one run; every method's default leaves the core's behaviour as it is.

    Grouped statistics (what :meth:`group` and :meth:`zeros` return) hold the step's total as ``.total`` (a
    :class:`~trl_prob.stats.TokenProbStats`) and add, ``all_reduce()`` and ``to_host()`` as it does.
    """

    name: str = "extension"  # for error lines
    batch_key: str | None = None  # the per-sample integer column / batch key it carries (None: none)
    state_key: str | None = None  # its entry in the schedule callback's checkpoint state (None: no state)

    # ------------------------------------------------------------------------------------- data

    def load_mixture(self, mixture):
        """A ``datasets:`` mixture as ``trl-prob sft`` loads it (default: TRL's ``get_dataset``)."""
        from trl import get_dataset

        return get_dataset(mixture)

    def prepare_datasets(self, train, evaluation):
        """The raw train and eval data before ``SFTTrainer`` prepares them; returns ``(train, evaluation)``."""
        return train, evaluation

    def prepare_eval(self, evaluation, prefix: str):
        """Evaluation data first seen by ``evaluate()`` (a dataset, a dict of them, a name or None)."""
        return evaluation

    def wrap_collator(self, collator):
        """The trainer's collator, once TRL built it."""
        return collator

    def first_rows(self, dataset, num_samples: int):
        """The rows a measurement of ``num_samples`` samples reads, or None for the first ``num_samples``."""
        return None

    # ------------------------------------------------------------------------------------- per micro-batch

    def needs(self) -> dict[str, tuple[str, ...]]:
        """The fused head's outputs it reads, by who reads them."""
        return {}

    def stats_columns(self) -> frozenset[str]:
        """The statistics' column groups (:data:`~trl_prob.stats.COLUMN_GROUPS`) its steps and metrics read from the
        grouped statistics; every group unless it says less."""
        from .stats import ALL_COLUMNS

        return ALL_COLUMNS

    def token_lambdas(self, tokens, batch: BatchInfo):
        """Each token's lambda for this micro-batch, or None for the run's schedule's."""
        return None

    def group(self, rows: torch.Tensor, values: torch.Tensor):
        """Grouped statistics of a micro-batch's per-sample rows (:meth:`TokenProbStats.per_sample`), or None."""
        return None

    def zeros(self, device):
        """Empty grouped statistics (a step without a micro-batch), or None where it groups nothing."""
        return None

    # ------------------------------------------------------------------------------------- per optimizer step

    def warm_start(self, groups) -> None:
        """Start from a measurement of the base model (its grouped statistics)."""

    def warm_start_lines(self) -> list[str]:
        """What the warm start set, one log line each."""
        return []

    def begin(self, total_steps: int, device="cpu") -> None:
        """Before the first optimizer step of a fresh run."""

    def log_step(self, groups, metrics: dict[str, list[float]]) -> float | None:
        """Metrics of the finished step (before :meth:`step`); returns the lambda it trained overall, or None."""
        return None

    def step(self, groups, device="cpu") -> None:
        """Account one finished optimizer step (its grouped statistics over all micro-batches and processes)."""

    def eval_metrics(self, groups) -> dict[str, float]:
        """Evaluation metrics of its groups (without the ``eval_`` prefix)."""
        return {}

    # ------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`."""

    def saved_state(self, checkpoint: str, state: Any, args) -> Any:
        """Its state in ``checkpoint`` (``state``: the entry under :attr:`state_key`, None if absent), checked; None to
        start afresh. Raises :class:`trl_prob.checkpoints.CheckpointError` naming what is wrong."""
        return None

    # ------------------------------------------------------------------------------------- probe

    def probe_entries(self, measurement, dataset, args) -> dict[str, dict]:
        """Its entries in the probe's report (``probe.json``'s ``sources``), from the probe's measurement."""
        return {}
