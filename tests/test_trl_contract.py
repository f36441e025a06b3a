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


# ------------------------------------------------------------------------------ the gate: a contract, not a version


def test_contract_holds_on_the_installed_trl():
    import trl_prob

    assert trl_prob.trl_contract_problem() is None


def test_newer_trl_that_keeps_the_contract_runs(monkeypatch):
    import trl_prob

    monkeypatch.setattr(trl_prob, "TESTED_TRL", ("0.1.0", "0.2.0"))  # the installed TRL is now "untested"
    monkeypatch.delenv("TRL_PROB_ALLOW_UNTESTED_TRL", raising=False)
    with pytest.warns(UserWarning, match="contract holds"):
        trl_prob.check_trl_version()


def _fused_head_without_outputs(model, temperature=1.0):
    pass


def _compute_loss_training_the_nll(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    outputs = model(**inputs, fused_lm_head=True)
    return outputs.loss


@pytest.mark.parametrize("broken, names", [
    (("add_fused_lm_head", None), "add_fused_lm_head (the fused log-prob head) is gone"),
    (("add_fused_lm_head", _fused_head_without_outputs), "add_fused_lm_head takes no `outputs`"),
    (("FusedCausalLMOutput", None), "FusedCausalLMOutput) has no log_probs, label_mask, entropy"),
    (("compute_loss", _compute_loss_training_the_nll), "no longer trains -outputs.log_probs"),
], ids=["no-head", "head-without-outputs", "output-without-fields", "compute-loss-trains-another-field"])  # fmt: skip
def test_newer_trl_that_breaks_the_contract_is_refused_in_one_line(monkeypatch, broken, names):
    import trl_prob
    from trl.trainer import utils

    name, value = broken
    monkeypatch.setattr(trl.SFTTrainer if name == "compute_loss" else utils, name, value)
    monkeypatch.setattr(trl_prob, "TESTED_TRL", ("0.1.0", "0.2.0"))
    monkeypatch.delenv("TRL_PROB_ALLOW_UNTESTED_TRL", raising=False)
    with pytest.raises(ImportError) as error:
        trl_prob.check_trl_version()
    message = str(error.value)
    assert names in message and f"trl {trl.__version__}" in message and len(message.splitlines()) == 1, message
    monkeypatch.setenv("TRL_PROB_ALLOW_UNTESTED_TRL", "1")  # the escape hatch
    trl_prob.check_trl_version()


def test_inside_the_tested_range_the_contract_is_not_inspected(monkeypatch):
    import trl_prob

    monkeypatch.setattr(trl_prob, "trl_contract_problem", lambda: pytest.fail("inspected"))
    trl_prob.check_trl_version()
