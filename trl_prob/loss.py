"""The per-micro-batch loss: the head's per-token record in, per-token loss and statistics out.

A pure function of tensors and numbers, so the trainer is glue and the loss is tested on its own against
autograd through full logits. The caller (TRL's ``SFTTrainer.compute_loss``) sums the per-token loss and divides
by the step's target-token count over all micro-batches and processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .head import HeadTokens
from .objectives import Objective, power_loss
from .stats import ALL_COLUMNS, TokenProbStats, head_fields


def objective_loss(
    tokens: HeadTokens,
    objective: Objective,
    objective_lambda: float | torch.Tensor = 1.0,
    mode: str = "blend",
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sample_index: torch.Tensor | None = None,
    num_samples: int | None = None,
    group: Callable[[torch.Tensor], Any] | None = None,
    columns: frozenset[str] = ALL_COLUMNS,
    start: Objective | None = None,
) -> tuple[torch.Tensor, Any]:
    """Per-token loss (fp32, 0 where ``mask`` is false) and the micro-batch's target-token statistics.

    Args:
        tokens: the micro-batch's per-token head outputs: log p of each target token (TRL's fused head: 0 on ignored
            positions), the label mask, and whatever else the head returned (``is_top1``, ``entropy``,
            ``log_sum_sq_probs``): the objective and the statistics read what they need from it.
        objective: the target objective f.
        objective_lambda: 0 is NLL, 1 the objective alone; a float, or a tensor broadcastable to ``log_p`` (one lambda
            per token: a per-token schedule or a run extension's).
        mode: ``blend`` trains (1 - lambda) nll + lambda f (``start`` in place of nll where given); ``exponent``
            trains ``power:(lambda a)`` for a ``power:a`` objective.
        all_reduce: sums a tensor over processes (returns it); ``None`` for one process. Thresholded objectives
            use it for the kept-token count of this micro-batch over all processes.
        sample_index, num_samples: for the sequence statistics (which sample each position belongs to, for
            padding-free batches); statistics only, never the loss.
        group: turns the micro-batch's per-sample statistics rows (:meth:`TokenProbStats.per_sample`, one per row or
            per ``sample_index`` sample) into the statistics returned (a run extension's grouped statistics, with the
            micro-batch's total as ``.total``); ``None``: the :class:`TokenProbStats` of the micro-batch.
        columns: the statistics' column groups to compute beside the base ones (:data:`~trl_prob.stats.COLUMN_GROUPS`:
            what the run's signal, schedule and metrics read); the loss never reads them.
        start: the objective a blend trains at lambda 0 (None: NLL, the paper's continuum); never thresholded.
    """
    log_p, mask = tokens.log_p, tokens.mask
    keep = objective.keep(log_p) & mask if objective.is_thresholded else None
    if group is None:
        stats = TokenProbStats.of_tokens(tokens, keep, sample_index, num_samples, columns)
        total = stats
    else:
        if sample_index is None:
            num_samples = log_p.shape[0]
            sample_index = torch.arange(num_samples, device=log_p.device)[:, None].expand_as(log_p)
        rows = TokenProbStats.per_sample(
            log_p, mask, sample_index, num_samples, keep, tokens.is_top1, **head_fields(tokens), columns=columns
        )
        stats = group(rows)
        total = TokenProbStats.from_rows(rows)
    log_p = log_p.float()
    per_token = isinstance(objective_lambda, torch.Tensor)
    # lambda in fp32 either way, so a per-token lambda equal to a float one gives the same bits (one source == global)
    lam = torch.as_tensor(objective_lambda, dtype=torch.float32, device=log_p.device)
    if mode == "exponent":
        a = lam * torch.tensor(objective.param, dtype=torch.float32)
        return power_loss(log_p, a if per_token else float(a)) * mask, stats
    loss = objective(log_p, tokens)
    if keep is not None:
        loss = loss * keep * kept_token_scale(total, all_reduce)
    if per_token or objective_lambda < 1.0:
        at_zero = -log_p if start is None else start(log_p, tokens)  # the blend's lambda-0 end
        loss = (1.0 - lam) * at_zero + lam * loss
    return loss * mask, stats


def kept_token_scale(
    stats: TokenProbStats, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Target tokens / kept tokens of this micro-batch (over all processes), 0 when nothing is kept.

    The caller divides the summed loss by the target-token count; this factor turns that into the paper's mean
    over the kept tokens. Exact with one micro-batch per step; with gradient accumulation each micro-batch uses
    its own kept share, as the paper's (verl) trainer does.
    """
    counts = torch.stack([stats.token_count, stats.kept_count])
    if all_reduce is not None:
        counts = all_reduce(counts)
    valid, kept = counts
    return torch.where(kept > 0, valid / kept.clamp(min=1), 0.0).float()


def distributed_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the processes of the default group (no-op without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor
