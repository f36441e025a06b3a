"""``objective_loss``, the per-micro-batch loss as a pure function, against autograd through full logits.

Reference: random fp64 logits [tokens x vocab], log_softmax, the paper's f(p) written in p space, the paper's
normaliser (target tokens, or kept tokens for thresholded families), the blend written out. Ours: the target
log-probabilities gathered from the same logits, passed to ``objective_loss``, summed and divided by the target
count as TRL does. Values and gradients w.r.t. the logits must agree.
"""

import pytest
import torch

from trl_prob.head import HeadTokens

from _reference import paper_loss
from trl_prob.loss import kept_token_scale, objective_loss
from trl_prob.objectives import get_objective
from trl_prob.stats import TokenProbStats

SPECS = ["nll", "p", "power:0.5", "power:10", "top_p:0.2", "bottom_p:0.2", "top_logp:0.05", "bottom_logp:0.3", "dft"]


def batch(seed=0, tokens=64, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    # Peaked logits so p spreads over (0, 1): some tokens are confident, some not.
    logits = (3 * torch.randn(tokens, vocab, generator=generator, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    mask = torch.rand(tokens, generator=generator) < 0.8
    return logits, targets, mask


def reference(logits, targets, mask, spec, lam):
    log_p = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    return paper_loss(log_p, mask, spec, lam)[0]


def ours(logits, targets, mask, spec, lam, mode="blend"):
    log_p = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    log_p = torch.where(mask, log_p, 0.0)  # TRL's fused head returns 0 on ignored positions
    loss, stats = objective_loss(HeadTokens(log_p.float(), mask), get_objective(spec), lam, mode)
    return loss.sum() / mask.sum(), stats


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("lam", [1.0, 0.3, 0.0])
def test_value_and_gradient_match_full_logits_autograd(spec, lam):
    logits, targets, mask = batch()
    want = reference(logits, targets, mask, spec, lam)
    (want_grad,) = torch.autograd.grad(want, logits)
    got, _ = ours(logits, targets, mask, spec, lam)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lam", [1.0, 0.4, 0.0])
def test_exponent_mode_is_power_of_lambda_k(lam):
    logits, targets, mask = batch(seed=1)
    got, _ = ours(logits, targets, mask, "power:8", lam, mode="exponent")
    want = reference(logits, targets, mask, f"power:{8 * lam}" if lam > 0 else "nll", 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_ignored_tokens_give_zero_loss_and_no_gradient():
    logits, targets, mask = batch(seed=2)
    for spec in SPECS:
        log_p = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1).float()
        loss, _ = objective_loss(HeadTokens(torch.where(mask, log_p, 0.0), mask), get_objective(spec), 0.5)
        assert (loss[~mask] == 0).all(), spec
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert (grad[~mask] == 0).all(), spec


def test_finite_at_the_ends():
    log_p = torch.tensor([-1e4, -100.0, -1e-9, 0.0])
    mask = torch.tensor([True, True, True, True])
    for spec in SPECS:
        x = log_p.clone().requires_grad_(True)
        loss, _ = objective_loss(HeadTokens(x, mask), get_objective(spec), 0.5)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), spec


def test_statistics_are_those_of_the_targets_and_kept_tokens():
    logits, targets, mask = batch(seed=3)
    _, stats = ours(logits, targets, mask, "top_p:0.2", 1.0)
    p = torch.softmax(logits.detach(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert stats.num_tokens == int(mask.sum())
    assert stats.mean_p == pytest.approx(p[mask].mean().item(), rel=1e-6)
    assert stats.kept_fraction == pytest.approx(((p >= 0.2) & mask).sum().item() / mask.sum().item(), rel=1e-9)


def test_kept_token_scale_counts_over_processes():
    stats = TokenProbStats.of(torch.tensor([-0.1, -3.0, -0.2, -4.0]), torch.ones(4, dtype=torch.bool),
                              torch.tensor([True, False, True, False]))
    assert kept_token_scale(stats).item() == pytest.approx(4 / 2)
    # another process with 4 target tokens, all kept: 8 / 6 over both
    assert kept_token_scale(stats, all_reduce=lambda t: t + torch.tensor([4.0, 4.0], dtype=t.dtype)).item() == pytest.approx(8 / 6)
    nothing = TokenProbStats.of(torch.zeros(2), torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
    assert kept_token_scale(nothing).item() == 0.0
