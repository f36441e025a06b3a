"""Measure where a model stands on the paper's capability continuum: target-token probability statistics.

One implementation serves ``trl-prob probe``, the adaptive schedule's warm start and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .stats import TokenProbStats


def measure_token_probs(
    model: torch.nn.Module,
    batches: Iterable[dict],
    prepare: Callable[[dict], dict] | None = None,
    progress: bool = True,
) -> TokenProbStats:
    """Statistics of p(target token) over ``batches`` (collated SFT batches with ``labels``), reduced over processes.

    ``model`` must carry TRL's fused log-prob head (``SFTTrainer`` adds it): no [tokens x vocab] logits are
    built. Runs in eval mode under ``torch.no_grad`` and restores the training mode afterwards.
    """
    was_training = model.training
    model.eval()
    stats = None
    try:
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="probe", disable=not _is_main_process())
        with torch.no_grad():
            for batch in iterator:
                batch = prepare(batch) if prepare is not None else batch
                outputs = model(**batch, fused_lm_head=True, use_cache=False)
                batch_stats = TokenProbStats.of(outputs.log_probs, outputs.label_mask)
                stats = batch_stats if stats is None else stats + batch_stats
    finally:
        model.train(was_training)
    if stats is None:
        stats = TokenProbStats.zeros(next(model.parameters()).device)
    return stats.all_reduce()


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
