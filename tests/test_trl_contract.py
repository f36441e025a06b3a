"""The TRL behaviour trl-prob relies on. If a TRL release changes it, these fail instead of training NLL silently.

1. ``SFTTrainer`` patches the model with a fused LM head: ``model(..., fused_lm_head=True)`` returns
   ``log_probs`` (target log-probabilities, differentiable, 0 on ignored labels) and ``label_mask``.
2. ``SFTTrainer.compute_loss`` trains ``-outputs.log_probs`` (what our wrapper rewrites), not ``outputs.loss``; the
   trainer checks it on the first training micro-batch too (the tripwire), and keeps the real log-probabilities as
   ``outputs.target_log_probs``.
3. The version gate is this contract: a TRL outside the tested range runs if it holds, and is refused if not.
"""

import pytest
import torch
import trl

from addition import random_tiny_llama
from conftest import first_batch, make_trainer
from trl_prob import TESTED_TRL


@pytest.fixture
def trainer(tmp_path, tokenizer):
    return make_trainer(tmp_path, tokenizer, random_tiny_llama(2), objective="p", per_device_train_batch_size=8)


def test_fused_head_returns_log_probs_and_label_mask(trainer):
    inputs = first_batch(trainer)
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
    inputs = first_batch(trainer)
    with torch.no_grad():
        out = trainer.model(**inputs, fused_lm_head=True)
        p = out.log_probs[out.label_mask].exp()
        loss = trainer.compute_loss(trainer.model, dict(inputs))
    torch.testing.assert_close(loss, (1 - p).mean(), rtol=1e-5, atol=1e-7)
    assert abs(loss.item() - out.loss.item()) > 0.1


# ------------------------------------------------------------------------------ the field we write, and its tripwire


def test_outputs_keep_the_target_log_probs_beside_the_trained_field(trainer):
    """Inside compute_loss, `log_probs` carries -f(p) (what TRL trains) and `target_log_probs` the model's own
    log-probabilities; the first training micro-batch checked that TRL trained the former."""
    inputs = first_batch(trainer)
    seen = []
    handle = trainer.model.register_forward_hook(lambda module, args, outputs: seen.append(outputs))
    trainer.model.train()
    assert trainer._trained_field_unchecked
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    handle.remove()
    (out,) = seen
    mask = out.label_mask
    with torch.no_grad():
        plain = trainer.model(**inputs, fused_lm_head=True)  # outside compute_loss: TRL's head, untouched
    torch.testing.assert_close(out.target_log_probs, plain.log_probs)
    p = out.target_log_probs[mask].exp()
    torch.testing.assert_close(out.log_probs[mask], -(1 - p))  # objective p: f(p) = 1 - p
    torch.testing.assert_close(loss, (1 - p).mean())
    assert not trainer._trained_field_unchecked  # checked once, on this first training micro-batch


def test_first_step_tripwire_does_not_fire_on_a_normal_run(trainer):
    trainer.train()
    assert not trainer._trained_field_unchecked
    assert len([entry for entry in trainer.state.log_history if "loss" in entry]) == trainer.args.max_steps


def test_first_step_tripwire_knows_trls_dft_weight(tmp_path, tokenizer):
    """objective nll with TRL's own loss_type='dft' (the one combination config allows): TRL weights what we wrote by
    its exp, and the tripwire expects that."""
    trainer = make_trainer(tmp_path, tokenizer, random_tiny_llama(2), rows=8, objective="nll", loss_type="dft",
                           max_steps=1)  # fmt: skip
    trainer.train()
    assert not trainer._trained_field_unchecked


def test_first_step_tripwire_fires_when_trl_trains_another_field(trainer, monkeypatch):
    """A TRL release whose compute_loss trains another field (here the model's own log-probabilities, i.e. NLL) is
    stopped on the first training micro-batch, in one line, before any optimizer step."""

    def release_training_another_field(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, fused_lm_head=True)
        count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        return -outputs.target_log_probs.sum() / count

    monkeypatch.setattr(trl.SFTTrainer, "compute_loss", release_training_another_field)
    with pytest.raises(RuntimeError, match=r"trains another field than `outputs.log_probs`, the one trl-prob writes") as error:
        trainer.train()
    assert len(str(error.value).splitlines()) == 1
    assert trainer.state.global_step == 0


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
