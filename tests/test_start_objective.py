"""A schedule whose lambda-0 end is another objective than NLL (trl_prob.experimental: ``schedule_start_objective``):
the blend (1 - lambda) start + lambda objective against the authors' formulas on full logits, the refusals, and a
trainer at lambda 0 training exactly what the start objective trains alone."""

from __future__ import annotations

import pytest
import torch

from addition import random_tiny_llama
from conftest import addition_dataset, base_args
from test_confidence import authors_loss, full_logits, head_tokens
from trl_prob import ProbSFTTrainer, get_objective
from trl_prob.experimental import ExperimentalSFTConfig
from trl_prob.loss import objective_loss


@pytest.mark.parametrize("start", ["eaft:1", "deft", "deft_cayley"])
@pytest.mark.parametrize("per_token", [False, True])
def test_blend_from_a_start_objective_matches_the_authors_formulas(start, per_token):
    logits, targets, mask = full_logits(seed=2)
    lam = torch.rand(mask.shape, generator=torch.Generator().manual_seed(5)) if per_token else 0.3
    ours_logits = logits.clone().requires_grad_(True)
    tokens = head_tokens(ours_logits, targets, mask)
    ours, _ = objective_loss(tokens, get_objective("p"), lam, start=get_objective(start))
    ref_logits = logits.clone().requires_grad_(True)
    p = torch.log_softmax(ref_logits, -1).gather(-1, targets[..., None]).squeeze(-1).exp()
    ref = torch.where(mask, (1 - lam) * authors_loss(start, ref_logits, targets, mask) + lam * (1 - p), 0.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


def config(tmp_path, **overrides):
    return ExperimentalSFTConfig(**base_args(tmp_path, bf16=False, **overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(objective="p"), r"schedule_start_objective='eaft:1' is the objective at lambda 0 of a schedule, but "
                              r"objective_schedule is 'none'"),
        (dict(objective="power:2", objective_schedule="adaptive", schedule_mode="exponent"),
         r"needs schedule_mode='blend'"),
        (dict(objective="eaft:1", objective_schedule="adaptive"), r"is the objective itself"),
    ],
)
def test_a_start_that_cannot_act_is_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        config(tmp_path, schedule_start_objective="eaft:1", **overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("start", ["top_p:0.5", "asft"])
def test_a_thresholded_or_reference_start_is_refused(tmp_path, start):
    with pytest.raises(ValueError, match=r"cannot be the start of a blend.*allowed: nll or an objective without"):
        config(tmp_path, objective="p", objective_schedule="adaptive", schedule_start_objective=start)


def test_an_unknown_start_names_the_valid_specs(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown objective 'eaf'.*Valid specs: nll, p"):
        config(tmp_path, objective="p", objective_schedule="adaptive", schedule_start_objective="eaf")


def test_at_lambda_zero_the_run_trains_the_start_objective_alone(tmp_path, tokenizer):
    """constant lambda 0 from eaft:1 toward p trains, step by step, the weights eaft:1 trains alone; and the start's
    head outputs are among the run's needs."""

    def train(name, **overrides):
        args = config(tmp_path / name, max_steps=3, **overrides)
        trainer = ProbSFTTrainer(model=random_tiny_llama(seed=0), args=args, train_dataset=addition_dataset(16),
                                 processing_class=tokenizer)  # fmt: skip
        trainer.train()
        return trainer, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    blend, blend_weights = train("blend", objective="p", objective_schedule="constant", schedule_constant_lambda=0.0,
                                 schedule_start_objective="eaft:1")  # fmt: skip
    assert blend.objective_hook.needs()["start objective 'eaft:1'"] == get_objective("eaft:1").reads
    _, alone = train("alone", objective="eaft:1")
    _, nll_weights = train("nll", objective="p", objective_schedule="constant", schedule_constant_lambda=0.0)
    for name, weight in alone.items():
        torch.testing.assert_close(blend_weights[name], weight, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(nll_weights[n], w) for n, w in alone.items())  # NLL's lambda 0 trains otherwise
