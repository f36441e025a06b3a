"""The TRL behaviour trl-prob relies on. If a TRL release changes it, these fail instead of training NLL silently.

1. ``SFTTrainer`` patches the model with a fused LM head: ``model(..., fused_lm_head=True)`` returns
   ``log_probs`` (target log-probabilities, differentiable, 0 on ignored labels) and ``label_mask``.
2. ``SFTTrainer.compute_loss`` trains ``-outputs.log_probs`` (what our wrapper rewrites), not ``outputs.loss``.
"""

import pytest
import torch
import trl

from addition import random_tiny_llama
from conftest import addition_dataset, base_args
from trl_prob import TESTED_TRL, ProbSFTConfig, ProbSFTTrainer  # noqa: F401


@pytest.fixture
def trainer(tmp_path, tokenizer):
    args = ProbSFTConfig(**base_args(tmp_path, objective="p", per_device_train_batch_size=8, bf16=False))
    return ProbSFTTrainer(model=random_tiny_llama(2), args=args, train_dataset=addition_dataset(16), processing_class=tokenizer)


def test_fused_head_returns_log_probs_and_label_mask(trainer):
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    out = trainer.model(**inputs, fused_lm_head=True)
    labels = inputs["labels"][:, 1:]
    assert out.log_probs.shape == labels.shape and out.log_probs.requires_grad
    assert torch.equal(out.label_mask, labels != -100)
    assert out.log_probs[~out.label_mask].abs().max().item() == 0.0
    logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.log_probs[out.label_mask], want[out.label_mask], rtol=1e-5, atol=1e-6)


def test_compute_loss_trains_the_rewritten_log_probs(trainer):
    """With objective p the loss is mean(1 - p); TRL's own NLL (outputs.loss) would be mean(-log p)."""
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        out = trainer.model(**inputs, fused_lm_head=True)
        p = out.log_probs[out.label_mask].exp()
        loss = trainer.compute_loss(trainer.model, dict(inputs))
    torch.testing.assert_close(loss, (1 - p).mean(), rtol=1e-5, atol=1e-7)
    assert abs(loss.item() - out.loss.item()) > 0.1


def test_trl_version_is_the_tested_range():
    from packaging.version import Version

    low, high = (Version(v) for v in TESTED_TRL)
    assert low <= Version(trl.__version__) < high
