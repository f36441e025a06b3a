"""The trainer's loss and gradients through the whole model against a full-logits autograd reference.

Reference: the model's ordinary forward (full [tokens x vocab] fp32 logits), log_softmax, the paper's f(p)
written in p space, the paper's normaliser, a mask derived from the raw token ids (completion tokens after
'=', no prompt, no padding). Ours: ``ProbSFTTrainer.compute_loss`` on TRL's fused chunked head.
"""

import pytest
import torch

from addition import random_tiny_llama
from conftest import addition_dataset, base_args
from _reference import reference_loss
from trl_prob import ProbSFTConfig, ProbSFTTrainer

# Thresholds are placed at the batch's median p, so each thresholded objective keeps some tokens and drops others.
SPECS = ["nll", "p", "power:0.5", "power:10", "top_p:MED", "bottom_p:MED", "top_logp:MED", "bottom_logp:MED", "dft"]


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def make_trainer(tmp_path, tokenizer, spec, **overrides):
    model = random_tiny_llama(seed=1)
    args = ProbSFTConfig(**base_args(tmp_path, objective=spec, per_device_train_batch_size=8, **overrides))
    return ProbSFTTrainer(model=model, args=args, train_dataset=addition_dataset(16), processing_class=tokenizer)


def median_p(trainer, inputs):
    with torch.no_grad():
        out = trainer.model(**inputs, fused_lm_head=True)
    return out.log_probs[out.label_mask].exp().median().item()


@pytest.mark.parametrize("spec", SPECS)
def test_loss_and_gradients_match_full_logits_reference(tmp_path, tokenizer, spec):
    trainer = make_trainer(tmp_path, tokenizer, spec.replace("MED", "0.5"))
    model = trainer.model
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    if "MED" in spec:
        spec = spec.replace("MED", f"{median_p(trainer, inputs):.6f}")
        trainer = make_trainer(tmp_path, tokenizer, spec)
        model = trainer.model
    assert (inputs["attention_mask"] == 0).any(), "the batch should contain padding"

    model.zero_grad()
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    ours = grads(model)

    model.zero_grad()
    ref, ref_per_token, mask = reference_loss(model, inputs, spec, tokenizer)
    ref.backward()
    want = grads(model)

    # TRL's labels must select exactly the completion tokens: no prompt, no padding.
    assert torch.equal(inputs["labels"][:, 1:] != -100, mask)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert ((ours - want).norm() / want.norm()).item() <= 1e-5

    # Per-token values: the wrapped head hands TRL -f(p), zero outside the completion.
    trainer._in_compute_loss = True
    try:
        with torch.no_grad():
            out = model(**inputs, fused_lm_head=True)
    finally:
        trainer._in_compute_loss = False
    per_token = -out.log_probs
    assert per_token[~mask].abs().max().item() == 0.0
    if not trainer.objective_hook.objective.is_thresholded:  # thresholded tokens carry the kept-token rescaling
        torch.testing.assert_close(per_token[mask], ref_per_token[mask].detach(), rtol=1e-5, atol=1e-6)


def _gradient_error_vs_reference(trainer, tokenizer, reference_spec, **reference_kwargs):
    """Relative error of the trainer's whole-model gradient on one batch against the full-logits reference."""
    model = trainer.model
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.zero_grad()
    trainer.compute_loss(model, dict(inputs)).backward()
    ours = grads(model)
    model.zero_grad()
    ref, _, _ = reference_loss(model, inputs, reference_spec, tokenizer, **reference_kwargs)
    ref.backward()
    return ((ours - grads(model)).norm() / grads(model).norm()).item()


@pytest.mark.parametrize("spec", ["power:10", "top_p:0.04"])
def test_blend_matches_reference(tmp_path, tokenizer, spec):
    """objective_schedule='constant': (1 - lambda) nll + lambda f."""
    trainer = make_trainer(tmp_path, tokenizer, spec, objective_schedule="constant", schedule_constant_lambda=0.3)
    trainer.begin_objective()
    assert trainer.objective_lambda == pytest.approx(0.3)
    assert _gradient_error_vs_reference(trainer, tokenizer, spec, lam=0.3) <= 1e-5


def test_exponent_mode_matches_reference(tmp_path, tokenizer):
    """schedule_mode='exponent' trains power:(lambda k)."""
    trainer = make_trainer(
        tmp_path, tokenizer, "power:10", objective_schedule="constant", schedule_constant_lambda=0.25, schedule_mode="exponent"
    )
    trainer.begin_objective()
    assert _gradient_error_vs_reference(trainer, tokenizer, "power:2.5") <= 1e-5
