"""Token-weighted statistics of target-token probabilities, summable across micro-batches and processes.

One flat fp64 vector holds every sum, so a whole optimizer step (all gradient-accumulation micro-batches,
all processes) reduces with a single all-reduce, and the probe and the trainer share one implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The paper's theory splits tokens at p = 0.55 (share above it: 72.8% - 81.2% at the model-strong end).
CONFIDENT_P = 0.55
# A confident conflict: the model puts sum_v p_v^2 >= 0.5 (so its top token has p >= 0.5) on another token than the
# target (target p < 0.5): what a noisy label looks like to a model that has learnt the task.
CONFLICT_SUM_SQ = 0.5
HISTOGRAM_BINS = 200

(_COUNT, _SUM_P, _SUM_NLL, _ABOVE, _KEPT, _SEQS, _SEQS_TOP1, _TOP1,
 _N_ENTROPY, _SUM_ENTROPY, _SUM_NORM_ENTROPY, _N_SUM_SQ, _SUM_SUM_SQ, _CONFLICTS, LAMBDA_SUM,
 _SEQS_TOP1_CLEAN) = range(16)  # fmt: skip
_HIST = 16  # LAMBDA_SUM: the trained tokens' lambda, summed by the trainer for a per-token schedule
WIDTH = _HIST + HISTOGRAM_BINS  # one statistics row: the sums, then the histogram

# What a reader asks the statistics for, beyond the columns every run reads (count, sum p, sum -log p, kept tokens,
# the per-token lambda): one name per group of columns. A group nobody asks for stays 0 (same row layout, same single
# all-reduce), so the hot path computes only what the run's signal, schedule and metrics read (issue 35).
COLUMN_GROUPS = {
    "confident": "tokens with p > 0.55",
    "top1": "top-1 tokens, sequences with a target, sequences all top-1 (needs is_top1)",
    "entropy": "entropy in nats and / ln V (needs entropy)",
    "sum_sq": "sum_v p_v^2 and confident conflicts (needs log_sum_sq_probs)",
    "top1_clean": "sequences all top-1 or confident conflict (needs is_top1 and log_sum_sq_probs)",
    "histogram": "the 200-bin histogram of p (median, quantiles, share above a p)",
}
ALL_COLUMNS = frozenset(COLUMN_GROUPS)
_IMPLIES = {"top1_clean": {"top1", "sum_sq"}}  # a group computed from others' columns


def column_groups(*groups) -> frozenset[str]:
    """The groups named (iterables of names), with the groups they are computed from; an unknown name is refused."""
    out = set()
    for names in groups:
        for name in names:
            if name not in COLUMN_GROUPS:
                raise ValueError(f"Unknown statistics column group {name!r}; allowed: {', '.join(COLUMN_GROUPS)}.")
            out |= {name} | _IMPLIES.get(name, set())
    return frozenset(out)


def sum_over_processes(sums: torch.Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)


@dataclass
class TokenProbStats:
    """Sums over target tokens: count, sum p, sum -log p, tokens with p > 0.55, kept tokens, sequences with a target,
    sequences whose every target token is the model's top-1 and top-1 tokens (when the head reports ``is_top1``),
    the entropy (nats and / ln V) and sum_v p_v^2 with the count of tokens they were reported for, confident
    conflicts (when the head reports ``log_sum_sq_probs``), histogram of p."""

    sums: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device | str = "cpu") -> TokenProbStats:
        return cls(torch.zeros(_HIST + HISTOGRAM_BINS, dtype=torch.float64, device=device))

    @classmethod
    def of(
        cls,
        log_p: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor | None = None,
        is_top1: torch.Tensor | None = None,
        sample_index: torch.Tensor | None = None,
        num_samples: int | None = None,
        columns: frozenset[str] = ALL_COLUMNS,
        **head,
    ) -> TokenProbStats:
        """Statistics of the positions where ``mask`` is true; ``keep`` marks the tokens a thresholded objective trains;
        ``columns``: the :data:`COLUMN_GROUPS` computed beside the base columns (the others stay 0).

        Sequences are the rows of ``log_p`` unless ``sample_index`` (padding-free batches) says otherwise. Written
        with masked sums and ``index_add_`` rather than boolean indexing: no host-device sync in the training hot path.
        """
        if sample_index is None:
            rows = torch.arange(log_p.shape[0] if log_p.dim() > 1 else 1, device=log_p.device)
            sample_index = rows[:, None].expand_as(log_p) if log_p.dim() > 1 else rows.expand_as(log_p)
            num_samples = rows.numel()
        rows = cls.per_sample(log_p, mask, sample_index, num_samples, keep, is_top1, columns=columns, **head)
        return cls(rows.sum(0))

    @classmethod
    def of_tokens(cls, tokens, keep=None, sample_index=None, num_samples=None, columns=ALL_COLUMNS) -> TokenProbStats:
        """:meth:`of` a micro-batch's :class:`~trl_prob.head.HeadTokens` (every output it carries)."""
        return cls.of(tokens.log_p, tokens.mask, keep, tokens.is_top1, sample_index, num_samples, columns,
                      **head_fields(tokens))  # fmt: skip

    @classmethod
    def per_sample(
        cls,
        log_p: torch.Tensor,
        mask: torch.Tensor,
        sample_index: torch.Tensor,
        num_samples: int,
        keep: torch.Tensor | None = None,
        is_top1: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        log_sum_sq_probs: torch.Tensor | None = None,
        vocab_size: int | None = None,
        columns: frozenset[str] = ALL_COLUMNS,
    ) -> torch.Tensor:
        """The sums, one row per sample (``[num_samples, width]``): what ``gather_for_metrics`` needs to drop the
        samples accelerate repeats to even out the last batch, so every sample counts once. Only the base columns and
        the :data:`COLUMN_GROUPS` in ``columns`` are computed; the others are 0."""
        want = column_groups(columns)
        if "top1" not in want:
            is_top1 = None
        if "entropy" not in want:
            entropy = None
        if "sum_sq" not in want:
            log_sum_sq_probs = None
        w = mask.to(torch.float64)
        log_p = log_p.detach().to(torch.float64) * w  # 0 where masked, so exp() = 1 there, weighted out below
        p = log_p.exp()
        width = _HIST + HISTOGRAM_BINS
        kept = w if keep is None else keep.detach().to(torch.float64) * w
        top1 = torch.zeros_like(w) if is_top1 is None else is_top1.detach().to(torch.float64) * w
        # columns 0-4, a scratch column (the sequence columns are derived from it below) and the top-1 tokens
        zeros = torch.zeros_like(w)
        confident = (p > CONFIDENT_P) * w if "confident" in want else zeros
        cols = [w, p * w, -log_p, confident, kept, zeros, zeros, top1]
        if entropy is None:
            cols += [zeros, zeros, zeros]
        else:
            h = entropy.detach().to(torch.float64) * w
            normalised = h / math.log(vocab_size) if vocab_size else zeros
            cols += [w, h, normalised]
        if log_sum_sq_probs is None:
            cols += [zeros, zeros, zeros]
        else:
            sum_sq = log_sum_sq_probs.detach().to(torch.float64).exp() * w
            cols += [w, sum_sq, ((sum_sq >= CONFLICT_SUM_SQ) & (p < 0.5)) * w]
        head = torch.stack(cols + [zeros, zeros], dim=-1)  # LAMBDA_SUM and a scratch column (derived below)
        rows = sample_index.flatten()
        out = torch.zeros(num_samples, width, dtype=torch.float64, device=p.device)
        out[:, :_HIST].index_add_(0, rows, head.reshape(-1, _HIST))
        if "histogram" in want:
            bins = (p * HISTOGRAM_BINS).long().clamp_(0, HISTOGRAM_BINS - 1).flatten()
            out.view(-1).index_add_(0, rows * width + _HIST + bins, w.flatten())
        has_targets = out[:, _COUNT] > 0
        all_top1 = has_targets & (out[:, _TOP1] == out[:, _COUNT])
        out[:, _SEQS] = has_targets.to(torch.float64) if is_top1 is not None else 0.0
        out[:, _SEQS_TOP1] = all_top1.to(torch.float64) if is_top1 is not None else 0.0
        # every target token top-1 or a confident conflict (a label the model confidently contradicts): exact but for
        # the labels a capable model rejects; needs both is_top1 and log_sum_sq_probs
        top1_or_conflict = has_targets & (out[:, _TOP1] + out[:, _CONFLICTS] == out[:, _COUNT])
        both = is_top1 is not None and log_sum_sq_probs is not None and "top1_clean" in want
        out[:, _SEQS_TOP1_CLEAN] = top1_or_conflict.to(torch.float64) if both else 0.0
        return out

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> TokenProbStats:
        return cls(rows.sum(0))

    def __add__(self, other: TokenProbStats) -> TokenProbStats:
        return TokenProbStats(self.sums + other.sums.to(self.sums.device))

    def all_reduce(self) -> TokenProbStats:
        """Sum over all processes (no-op without an initialised process group)."""
        sum_over_processes(self.sums)
        return self

    def to_host(self) -> TokenProbStats:
        """The sums on the host: one device-to-host transfer (none on CPU), after which no statistic syncs."""
        return TokenProbStats(self.sums.detach().cpu())

    @property
    def token_count(self) -> torch.Tensor:
        """Target tokens, as a tensor on the statistics' device (no sync)."""
        return self.sums[_COUNT]

    @property
    def kept_count(self) -> torch.Tensor:
        """Tokens a thresholded objective keeps, as a tensor on the statistics' device (no sync)."""
        return self.sums[_KEPT]

    @property
    def num_tokens(self) -> int:
        return int(self.sums[_COUNT].item())

    def _ratio(self, index: int) -> float:
        count = self.sums[_COUNT].item()
        return self.sums[index].item() / count if count > 0 else float("nan")

    @property
    def mean_p(self) -> float:
        """Mean target-token probability: the paper's capability proxy (their Eq. 5)."""
        return self._ratio(_SUM_P)

    @property
    def nll(self) -> float:
        return self._ratio(_SUM_NLL)

    @property
    def share_confident(self) -> float:
        """Share of target tokens with p > 0.55."""
        return self._ratio(_ABOVE)

    def share_above(self, p: float) -> float:
        """Share of target tokens with probability at or above ``p`` (from the histogram: ``p`` rounds to a bin edge)."""
        count = self.sums[_COUNT].item()
        first = min(HISTOGRAM_BINS, round(p * HISTOGRAM_BINS))
        return self.sums[_HIST + first :].sum().item() / count if count > 0 else float("nan")

    @property
    def kept_fraction(self) -> float:
        return self._ratio(_KEPT)

    @property
    def histogram(self) -> torch.Tensor:
        """Token counts in ``HISTOGRAM_BINS`` equal bins over [0, 1]."""
        return self.sums[_HIST:].clone()

    def quantile(self, q: float) -> float:
        """Quantile of p from the histogram, linear within a bin (error below 1 / HISTOGRAM_BINS)."""
        hist = self.sums[_HIST:].cpu()
        total = hist.sum().item()
        if total <= 0:
            return float("nan")
        cumulative = torch.cumsum(hist, 0)
        target = q * total
        index = int(torch.searchsorted(cumulative, torch.tensor(target, dtype=cumulative.dtype)).clamp(max=len(hist) - 1))
        below = cumulative[index - 1].item() if index > 0 else 0.0
        inside = hist[index].item()
        fraction = (target - below) / inside if inside > 0 else 0.0
        return (index + min(max(fraction, 0.0), 1.0)) / HISTOGRAM_BINS

    @property
    def median_p(self) -> float:
        return self.quantile(0.5)

    @property
    def geometric_mean_p(self) -> float:
        """exp(-mean NLL): the per-token probability of the whole targets, dominated by the hardest tokens."""
        return math.exp(-self.nll) if self.num_tokens > 0 else float("nan")

    @property
    def sequence_top1_share(self) -> float:
        """Share of sequences whose every target token is the model's top-1 choice (greedy exact match, teacher-forced);
        NaN where the head did not report ``is_top1``."""
        sequences = self.sums[_SEQS].item()
        return self.sums[_SEQS_TOP1].item() / sequences if sequences > 0 else float("nan")

    @property
    def sequence_top1_share_without_conflicts(self) -> float:
        """Share of sequences whose every target token is the model's top-1 choice or a confident conflict (sum_v p_v^2
        >= 0.5 on another token): teacher-forced exact match that a label the model confidently contradicts does not
        spoil. NaN without both ``is_top1`` and ``log_sum_sq_probs``."""
        sequences = self.sums[_SEQS].item()
        if sequences <= 0 or self.sums[_N_SUM_SQ].item() <= 0:
            return float("nan")
        return self.sums[_SEQS_TOP1_CLEAN].item() / sequences

    def _reported_ratio(self, index: int, count: int) -> float:
        n = self.sums[count].item()
        return self.sums[index].item() / n if n > 0 else float("nan")

    @property
    def mean_lambda(self) -> float:
        """Mean lambda over the target tokens, for per-token schedules (0 where nobody summed it)."""
        return self._ratio(LAMBDA_SUM)

    @property
    def mean_entropy(self) -> float:
        """Mean entropy of the next-token distribution over target positions (nats); NaN without ``entropy``."""
        return self._reported_ratio(_SUM_ENTROPY, _N_ENTROPY)

    @property
    def mean_normalised_entropy(self) -> float:
        """Mean H / ln V over target positions, in [0, 1]; NaN without ``entropy`` (or the vocabulary size)."""
        return self._reported_ratio(_SUM_NORM_ENTROPY, _N_ENTROPY)

    @property
    def mean_sum_sq_probs(self) -> float:
        """Mean sum_v p_v^2 (the model's confidence) over target positions; NaN without ``log_sum_sq_probs``."""
        return self._reported_ratio(_SUM_SUM_SQ, _N_SUM_SQ)

    @property
    def conflict_share(self) -> float:
        """Share of target tokens that are confident conflicts (sum_v p_v^2 >= 0.5 on another token: target p < 0.5);
        NaN without ``log_sum_sq_probs``."""
        return self._reported_ratio(_CONFLICTS, _N_SUM_SQ)

    @property
    def token_top1_share_without_conflicts(self) -> float:
        """Share of top-1 target tokens among those that are not confident conflicts (a conflict is never top-1):
        the model's accuracy on the labels it does not confidently contradict. NaN without both outputs."""
        if self.sums[_SEQS].item() <= 0 or self.sums[_N_SUM_SQ].item() <= 0:
            return float("nan")
        rest = self.sums[_COUNT].item() - self.sums[_CONFLICTS].item()
        return self.sums[_TOP1].item() / rest if rest > 0 else float("nan")

    @property
    def token_top1_share(self) -> float:
        """Share of target tokens that are the model's top-1 choice (TRL's mean_token_accuracy); NaN without
        ``is_top1``."""
        return self._ratio(_TOP1) if self.sums[_SEQS].item() > 0 else float("nan")


def head_fields(tokens) -> dict:
    """The optional head outputs of a :class:`~trl_prob.head.HeadTokens`, as :meth:`TokenProbStats.per_sample`'s
    keyword arguments."""
    return dict(entropy=tokens.entropy, log_sum_sq_probs=tokens.log_sum_sq_probs, vocab_size=tokens.vocab_size)
