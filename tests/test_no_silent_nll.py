"""Nothing trains plain NLL while saying it trains another objective: each way it could is one error before step 1."""

from __future__ import annotations

import pytest

from conftest import base_args, logits_loss_trainer_class
from trl_prob import ProbSFTConfig, ProbSFTTrainer

LogitsLossTrainer = logits_loss_trainer_class()


@pytest.mark.parametrize("objective", ["p", "deft", "auto"])
def test_liger_with_its_default_config_is_refused_in_the_config(tmp_path, objective):
    """use_liger_kernel alone (Liger's default config turns its fused cross-entropy on) is refused by ProbSFTConfig
    itself, with a line that names Liger's fused cross-entropy, not an install hint."""
    with pytest.raises(ValueError, match="Liger's fused linear cross-entropy") as info:
        ProbSFTConfig(**base_args(tmp_path), objective=objective, use_liger_kernel=True)
    assert "pip install" not in str(info.value)
    assert "\n" not in str(info.value)


def test_a_forward_without_the_fused_head_is_refused_for_an_objective(tmp_path, tiny_model, tokenizer, train_dataset):
    trainer = LogitsLossTrainer(model=tiny_model, args=ProbSFTConfig(**base_args(tmp_path), objective="p"),
                                processing_class=tokenizer, train_dataset=train_dataset)  # fmt: skip
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(RuntimeError, match="without TRL's fused log-prob head"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all((v == before[k]).all() for k, v in tiny_model.state_dict().items())  # nothing was trained


def test_the_same_forward_is_left_alone_for_plain_nll(tmp_path, tiny_model, tokenizer, train_dataset):
    """With objective nll the trainer has nothing to replace: the subclass's own loss trains."""
    trainer = LogitsLossTrainer(model=tiny_model, args=ProbSFTConfig(**base_args(tmp_path, max_steps=1)),
                                processing_class=tokenizer, train_dataset=train_dataset)  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_forward_that_ignores_the_fused_head_is_refused(tmp_path, tiny_model, tokenizer, train_dataset):
    """A model whose forward returns logits although asked for the fused head (no TRL head on it) is refused."""
    trainer = ProbSFTTrainer(model=tiny_model, args=ProbSFTConfig(**base_args(tmp_path), objective="p"),
                             processing_class=tokenizer, train_dataset=train_dataset)  # fmt: skip
    model = trainer.model
    original = model.forward

    def forward_without_head(*args, fused_lm_head=False, **kwargs):  # the head taken off again
        return original(*args, **kwargs)

    model.forward = forward_without_head
    with pytest.raises(RuntimeError, match="ignored fused_lm_head=True"):
        trainer.train()
