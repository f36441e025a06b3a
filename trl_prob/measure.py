"""One way to measure target-token probabilities: the trainer's warm start and evaluation, ``trl-prob probe``, the
benchmarks and the quickstart all call :func:`measure`.

It runs a model that carries TRL's fused log-prob head (``SFTTrainer`` adds it; ``trl.add_fused_lm_head`` for a bare
model) over collated SFT batches: no [tokens x vocab] logits, ``torch.no_grad``, eval mode. Statistics are kept per
sample and passed through ``gather`` (the trainer's ``accelerator.gather_for_metrics``), which drops the samples that
accelerate repeats to even out the last batch across processes, so every sample counts once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .head import HeadTokens
from .stats import ALL_COLUMNS, TokenProbStats, head_fields


@dataclass
class Measurement:
    """What one pass over the batches saw: token statistics, and how many samples (and how many had no target)."""

    stats: TokenProbStats
    num_samples: int
    num_samples_without_targets: int
    groups: Any = None  # a run extension's grouped statistics (trl_prob.extension), when it groups the samples


def measure(
    model: torch.nn.Module,
    batches: Iterable[dict],
    prepare: Callable[[dict], dict] | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    check: Callable[[HeadTokens], None] | None = None,
    vocab_size: int | None = None,
    extension=None,
) -> Measurement:
    """Statistics of p(target token) over ``batches`` (collated SFT batches with ``labels``).

    Args:
        model: a causal LM with TRL's fused log-prob head.
        batches: collated batches (``input_ids``, ``labels``, optionally padding-free ``cu_seq_lens_q``).
        prepare: moves a batch to the model's device (the trainer's ``_prepare_inputs``).
        gather: all-gathers per-sample rows across processes, dropping accelerate's repeated samples
            (``accelerator.gather_for_metrics``); ``None`` for a single process.
        progress: show a progress bar (main process only).
        check: called on each batch's head outputs (:class:`~trl_prob.head.HeadTokens`) before they are counted: the
            trainer refuses there a forward that lacks an output the run reads.
        vocab_size: the model's vocabulary size, for the statistics of H / ln V.
        extension: the run's :class:`~trl_prob.extension.RunExtension`: its batch key is taken out of each batch before
            the model sees it, and the measurement also holds its grouped statistics (``Measurement.groups``).
    """
    was_training = model.training
    model.eval()
    stats = None
    key = extension.batch_key if extension is not None else None
    groups = extension.zeros("cpu") if key is not None else None
    seen = without_targets = 0
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="measuring p", unit="batch", disable=not is_main_process())
    try:
        with torch.no_grad():
            for batch in iterator:
                batch = prepare(batch) if prepare is not None else batch
                batch = dict(batch)
                values = batch.pop(key, None) if key is not None else None
                if key is not None and values is None:
                    raise ValueError(f"{extension.name}: measure() needs each batch's {key!r} (a custom collator?).")
                outputs = model(**batch, fused_lm_head=True, use_cache=False)
                tokens = HeadTokens.from_outputs(outputs, vocab_size)
                if check is not None:
                    check(tokens)
                rows = per_sample_stats(batch, tokens.log_p, tokens.mask, tokens=tokens)
                rows, values = gather_rows(rows, gather, values)
                if groups is not None:
                    groups = groups + extension.group(rows, values).to_host()
                stats = TokenProbStats.from_rows(rows) + stats if stats is not None else TokenProbStats.from_rows(rows)
                seen += rows.shape[0]
                without_targets += int((rows[:, 0] == 0).sum())
    finally:
        model.train(was_training)
    if stats is None:
        stats = TokenProbStats.zeros()
    return Measurement(stats.to_host(), seen, without_targets, groups)


def per_sample_stats(
    batch: dict,
    log_p: torch.Tensor,
    label_mask: torch.Tensor,
    keep: torch.Tensor | None = None,
    tokens: HeadTokens | None = None,
    columns: frozenset[str] = ALL_COLUMNS,
) -> torch.Tensor:
    """[samples, width] statistics of one batch, one row per sample (padding-free rows split at ``cu_seq_lens_q``),
    with every other head output ``tokens`` carries (``columns``: the column groups computed, all by default)."""
    extra = head_fields(tokens) if tokens is not None else {}
    return TokenProbStats.per_sample(
        log_p, label_mask, sample_index(batch, label_mask), num_samples(batch), keep,
        tokens.is_top1 if tokens is not None else None, **extra, columns=columns,
    )  # fmt: skip


def gather_rows(
    rows: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None, values: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample rows (and each sample's integer value: a run extension's batch key) from every process. The value
    travels as one more column, so one gather keeps rows and values paired, whatever samples ``gather`` drops."""
    if values is not None:
        rows = torch.cat([rows, values.to(rows.device, rows.dtype)[:, None]], dim=1)
    rows = gather(rows) if gather is not None else rows
    if values is None:
        return rows, None
    return rows[:, :-1], rows[:, -1].long()


def num_samples(batch: dict) -> int:
    # Padding-free batches flatten every sample into one row; `cu_seq_lens_q` holds the boundaries.
    if batch.get("cu_seq_lens_q") is not None:
        return batch["cu_seq_lens_q"].numel() - 1
    return batch["input_ids"].shape[0]


def sample_index(batch: dict, label_mask: torch.Tensor) -> torch.Tensor:
    """Index of the sample each position of ``label_mask`` (shifted: position j predicts token j + 1) belongs to."""
    if batch.get("cu_seq_lens_q") is not None:
        boundaries = batch["cu_seq_lens_q"].to(label_mask.device, torch.long)
        predicted = torch.arange(1, label_mask.shape[-1] + 1, device=label_mask.device)
        if label_mask.shape[-1] == batch["input_ids"].shape[-1]:  # `shift_labels` given: not shifted
            predicted = predicted - 1
        index = torch.searchsorted(boundaries[1:], predicted, right=True).clamp_(max=boundaries.numel() - 2)
        return index.expand_as(label_mask)
    rows = torch.arange(label_mask.shape[0], device=label_mask.device)
    return rows[:, None].expand_as(label_mask)


def is_main_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0
