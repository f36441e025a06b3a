"""TokenProbStats: the sums behind the probe, the adaptive schedule and the logged metrics."""

from __future__ import annotations

import math

import pytest
import torch

from trl_prob.stats import CONFIDENT_P, HISTOGRAM_BINS, TokenProbStats

BIN = 1.0 / HISTOGRAM_BINS


def _random_log_p(shape=(6, 40), seed=0):
    generator = torch.Generator().manual_seed(seed)
    # A spread of probabilities from near 0 to near 1, like a partly trained model.
    p = torch.rand(shape, generator=generator) ** 2
    mask = torch.rand(shape, generator=generator) > 0.3
    return p.clamp_min(1e-6).log(), mask


def test_sums_over_chunks_equal_the_whole():
    log_p, mask = _random_log_p()
    whole = TokenProbStats.of(log_p, mask)
    parts = [TokenProbStats.of(log_p[i : i + 2], mask[i : i + 2]) for i in range(0, log_p.shape[0], 2)]
    summed = parts[0]
    for part in parts[1:]:
        summed = summed + part
    torch.testing.assert_close(summed.sums, whole.sums)
    assert summed.num_tokens == int(mask.sum())
    assert summed.mean_p == pytest.approx(whole.mean_p)
    assert summed.median_p == pytest.approx(whole.median_p)


def test_values_match_a_direct_computation():
    log_p, mask = _random_log_p(seed=1)
    stats = TokenProbStats.of(log_p, mask)
    p = log_p[mask].double().exp()
    assert stats.num_tokens == p.numel()
    assert stats.mean_p == pytest.approx(p.mean().item(), rel=1e-9)
    assert stats.nll == pytest.approx(-p.log().mean().item(), rel=1e-9)
    assert stats.share_confident == pytest.approx((p > CONFIDENT_P).double().mean().item())
    assert stats.histogram.sum().item() == p.numel()


def test_keep_counts_kept_tokens_only_inside_the_mask():
    log_p, mask = _random_log_p(seed=2)
    keep = log_p.exp() >= 0.2
    stats = TokenProbStats.of(log_p, mask, keep)
    assert stats.kept_fraction == pytest.approx((keep & mask).sum().item() / mask.sum().item())


@pytest.mark.parametrize("q", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_quantiles_match_torch_within_a_bin(q):
    log_p, mask = _random_log_p(shape=(32, 64), seed=3)
    stats = TokenProbStats.of(log_p, mask)
    expected = torch.quantile(log_p[mask].double().exp(), q).item()
    assert abs(stats.quantile(q) - expected) <= BIN


def test_median_of_a_point_mass_lies_in_its_bin():
    p = torch.full((100,), 0.4321)
    stats = TokenProbStats.of(p.log(), torch.ones_like(p, dtype=torch.bool))
    assert abs(stats.median_p - 0.4321) <= BIN


def test_no_tokens_gives_nan():
    log_p = torch.zeros(2, 3)
    stats = TokenProbStats.of(log_p, torch.zeros_like(log_p, dtype=torch.bool))
    assert stats.num_tokens == 0
    for value in (stats.mean_p, stats.median_p, stats.nll, stats.share_confident, stats.kept_fraction):
        assert math.isnan(value)
    assert math.isnan(TokenProbStats.zeros().mean_p)


def test_all_reduce_without_process_group_is_a_no_op():
    log_p, mask = _random_log_p(seed=4)
    stats = TokenProbStats.of(log_p, mask)
    before = stats.sums.clone()
    assert stats.all_reduce() is stats
    torch.testing.assert_close(stats.sums, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the transfer only exists with a device (CPU: same tensor)")
def test_to_host_moves_the_sums_off_the_device():
    log_p, mask = _random_log_p(seed=5)
    stats = TokenProbStats.of(log_p.cuda(), mask.cuda())
    host = stats.to_host()
    assert host.sums.device.type == "cpu"
    torch.testing.assert_close(host.sums, stats.sums.cpu())


def test_statistics_read_from_the_host_equal_those_read_in_place():
    log_p, mask = _random_log_p(seed=5)
    stats = TokenProbStats.of(log_p, mask, keep=log_p > math.log(0.2))
    host = stats.to_host()
    assert host.sums.device.type == "cpu"
    for name in ("num_tokens", "mean_p", "nll", "share_confident", "kept_fraction", "median_p"):
        assert getattr(host, name) == getattr(stats, name)


def test_sequence_top1_share_counts_whole_completions():
    # 3 sequences: all targets top-1; one target missed; no target at all (not counted)
    log_p = torch.log(torch.tensor([[0.9, 0.8, 0.5], [0.9, 0.2, 0.7], [1.0, 1.0, 1.0]]))
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    is_top1 = torch.tensor([[True, True, False], [True, False, True], [False, False, False]])
    stats = TokenProbStats.of(log_p, mask, is_top1=is_top1)
    assert stats.sequence_top1_share == 0.5
    assert stats.token_top1_share == 4 / 5
    # the same tokens flattened padding-free into one row: sample_index says which sample each belongs to
    flat = TokenProbStats.of(log_p.reshape(1, -1), mask.reshape(1, -1), is_top1=is_top1.reshape(1, -1),
                             sample_index=torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]]), num_samples=3)
    torch.testing.assert_close(flat.sums, stats.sums)
    assert math.isnan(TokenProbStats.of(log_p, mask).sequence_top1_share)  # the head did not report is_top1


def test_sequence_top1_clean_forgives_only_confident_conflicts():
    """Against a per-sequence loop over full distributions: a completion counts when each target token is the argmax
    or the model puts sum_v p_v^2 >= 0.5 on another token (a label it confidently contradicts)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 7, 5, generator=generator) * torch.rand(40, 1, 1, generator=generator) * 6
    targets = torch.randint(0, 5, (40, 7), generator=generator)
    targets[:10] = logits[:10].argmax(-1)  # some completions exact throughout
    mask = torch.rand(40, 7, generator=generator) > 0.2
    probs = logits.softmax(-1)
    log_p = probs.gather(-1, targets[..., None]).squeeze(-1).log()
    is_top1 = logits.argmax(-1) == targets
    log_sum_sq = probs.pow(2).sum(-1).log()
    stats = TokenProbStats.of(log_p, mask, is_top1=is_top1, log_sum_sq_probs=log_sum_sq)
    exact = clean = rows = 0
    for b in range(40):
        tokens = [t for t in range(7) if mask[b, t]]
        if not tokens:
            continue
        rows += 1
        exact += all(is_top1[b, t] for t in tokens)
        clean += all(is_top1[b, t] or (probs[b, t].pow(2).sum() >= 0.5 and probs[b, t, targets[b, t]] < 0.5)
                     for t in tokens)
    assert clean > exact > 0  # the data exercise both
    assert stats.sequence_top1_share == pytest.approx(exact / rows)
    assert stats.sequence_top1_share_without_conflicts == pytest.approx(clean / rows)
    assert math.isnan(TokenProbStats.of(log_p, mask, is_top1=is_top1).sequence_top1_share_without_conflicts)


def test_geometric_mean_is_exp_of_minus_mean_nll():
    p = torch.tensor([0.9, 0.1, 0.5, 0.99])
    stats = TokenProbStats.of(p.log(), torch.ones(4, dtype=torch.bool))
    assert stats.geometric_mean_p == pytest.approx(math.prod(p.tolist()) ** 0.25, rel=1e-7)  # p.log() rounds in fp32
    assert stats.geometric_mean_p < stats.mean_p
