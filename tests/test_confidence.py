"""The confidence-aware families (DEFT, DEFT Cayley, EAFT) and the per-token head seam they ride on.

References are written from the authors' formulas on full fp32 logits (softmax over the whole vocabulary, autograd
through the logits), never from trl-prob's own code: DEFT's ``-(exp(a log p) - 1) / (a + 1e-6)`` with ``a = sum_v
p_v^2`` detached; its Cayley variant with ``a = clamp(f + (1 - f)(1 - d)/(1 + d), 0.001, 1)``, ``d = 1 - p``, ``f =
0.5 x`` the micro-batch's mean target p; EAFT's ``-log p x sg(H / ln V)^alpha``.
"""

import math

import pytest
import torch

from _reference import completion_mask
from addition import random_tiny_llama
from conftest import addition_dataset, base_args
from trl_prob.experimental import ExperimentalSFTConfig  # noqa: E402  (the research knobs these tests use)
from trl_prob import ProbSFTConfig, ProbSFTTrainer, get_objective
from trl_prob.head import HeadTokens, MissingHeadOutput
from trl_prob.loss import objective_loss
from trl_prob.objectives import Family, register_family, unregister_family
from trl_prob.schedules import Signal, register_signal, unregister_signal

V = 37


def full_logits(seed=0, rows=3, width=6, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, width, V, generator=generator, dtype=torch.float64) * scale).float()
    targets = torch.randint(0, V, (rows, width), generator=generator)
    mask = torch.rand(rows, width, generator=generator) > 0.25
    return logits, targets, mask


def authors_loss(spec: str, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The per-token loss as the authors write it, on full fp32 logits; 0 where the mask is off."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    log_p = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    family, _, param = spec.partition(":")
    if family == "deft":
        a = (probs**2).sum(-1).detach()
        loss = -(torch.exp(a * log_p) - 1) / (a + 1e-6)
    elif family == "deft_cayley":
        p = log_p.exp().detach()
        f = 0.5 * p[mask].mean()
        d = 1 - p
        a = torch.clamp(f + (1 - f) * (1 - d) / (1 + d), 0.001, 1.0)
        loss = -(torch.exp(a * log_p) - 1) / (a + 1e-8)
    elif family == "eaft":
        entropy = -(probs * log_probs).sum(-1).detach()
        loss = -log_p * (entropy / math.log(logits.shape[-1])) ** float(param)
    else:
        raise ValueError(spec)
    return torch.where(mask, loss, 0.0)


def head_tokens(logits, targets, mask) -> HeadTokens:
    """What TRL's fused head returns for these logits (computed here from the full distribution, detached where TRL
    detaches), with log p differentiable through the logits."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    log_p = torch.where(mask, log_probs.gather(-1, targets[..., None]).squeeze(-1), 0.0)
    return HeadTokens(
        log_p=log_p,
        mask=mask,
        is_top1=(log_probs.argmax(-1) == targets) & mask,
        entropy=torch.where(mask, -(probs * log_probs).sum(-1), 0.0),
        log_sum_sq_probs=torch.where(mask, (probs**2).sum(-1).log(), 0.0).detach(),
        vocab_size=V,
    )


SPECS = ["deft", "deft_cayley", "eaft:1", "eaft:0.5"]


@pytest.mark.parametrize("spec", SPECS)
def test_value_and_logit_gradient_match_the_authors_formula(spec):
    logits, targets, mask = full_logits()
    ours_logits = logits.clone().requires_grad_(True)
    tokens = head_tokens(ours_logits, targets, mask)
    ours = get_objective(spec)(tokens.log_p, tokens) * mask
    ref_logits = logits.clone().requires_grad_(True)
    ref = authors_loss(spec, ref_logits, targets, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
def test_gradient_weight_is_minus_df_dlogp(spec):
    logits, targets, mask = full_logits(seed=1)
    tokens = head_tokens(logits, targets, mask)
    log_p = tokens.log_p.detach().requires_grad_(True)
    objective = get_objective(spec)
    (objective(log_p, tokens) * mask).sum().backward()
    weight = objective.weight(log_p.detach().exp(), tokens)
    torch.testing.assert_close(-log_p.grad[mask], weight[mask], rtol=1e-5, atol=1e-7)


def test_limits_deft_is_nll_when_flat_and_p_when_certain():
    log_p = torch.tensor([-3.0, -0.2])
    mask = torch.ones(2, dtype=torch.bool)
    flat = HeadTokens(log_p, mask, log_sum_sq_probs=torch.full((2,), -math.log(1e6)))  # a = 1e-6
    certain = HeadTokens(log_p, mask, log_sum_sq_probs=torch.zeros(2))  # a = 1
    deft = get_objective("DEFT")  # the authors' key
    torch.testing.assert_close(deft(log_p, certain), get_objective("p")(log_p) / (1 + 1e-6))
    torch.testing.assert_close(deft(log_p, flat), -log_p * 1e-6 / (2e-6), rtol=1e-3, atol=1e-3)  # (1-p^a)/(a+eps) ~ -log p/2
    assert get_objective("Cayley_Trans").spec == "deft_cayley"


@pytest.mark.parametrize("spec", SPECS)
def test_finite_at_p_to_0_and_1_and_zero_on_ignored(spec):
    log_p = torch.tensor([-1e4, -80.0, -1e-7, 0.0, 0.0])
    mask = torch.tensor([True, True, True, True, False])
    tokens = HeadTokens(log_p, mask, entropy=torch.tensor([0.0, 3.6, 1e-6, 0.0, 0.0]),
                        log_sum_sq_probs=torch.tensor([0.0, -3.6, -1e-7, 0.0, 0.0]), vocab_size=V)  # fmt: skip
    loss, _ = objective_loss(tokens, get_objective(spec))
    assert torch.isfinite(loss).all() and loss[-1] == 0.0 and loss[3] == 0.0


@pytest.mark.parametrize("spec, message", [("eaft:0", "alpha must be > 0, got 0"), ("eaft:-1", "alpha must be > 0"),
                                           ("deft:2", "takes no parameter"), ("eaft", "needs a parameter alpha")])
def test_bad_parameters_are_one_line(spec, message):
    with pytest.raises(ValueError, match=message):
        get_objective(spec)


def test_cayley_mean_is_per_micro_batch():
    """With gradient accumulation, each micro-batch's Cayley exponent uses its own mean target p (as the authors'
    trainer does per forward): the two halves of a batch differ from the whole."""
    logits, targets, mask = full_logits(seed=2, rows=4)
    whole = authors_loss("deft_cayley", logits, targets, mask)
    halves = torch.cat([authors_loss("deft_cayley", logits[i : i + 2], targets[i : i + 2], mask[i : i + 2])
                        for i in (0, 2)])  # fmt: skip
    tokens = head_tokens(logits, targets, mask)
    ours = torch.cat([get_objective("deft_cayley")(tokens.rows(i, i + 2).log_p, tokens.rows(i, i + 2)) for i in (0, 2)])
    torch.testing.assert_close(ours * mask, halves)
    assert not torch.allclose(whole, halves)


# ------------------------------------------------------------------------------------- through the whole model


def make_trainer(tmp_path, tokenizer, spec, **overrides):
    args = ExperimentalSFTConfig(**base_args(tmp_path, objective=spec, per_device_train_batch_size=8, **overrides))
    return ProbSFTTrainer(model=random_tiny_llama(seed=1), args=args, train_dataset=addition_dataset(16),
                          processing_class=tokenizer)  # fmt: skip


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def model_reference(model, inputs, spec, tokenizer, rows=None):
    """The authors' loss on the model's full logits, normalised like TRL (sum over target tokens / their count);
    ``rows`` splits the batch into micro-batches (gradient accumulation), each with its own batch statistics."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    targets = inputs["input_ids"][:, 1:]
    mask = completion_mask(inputs["input_ids"], inputs["attention_mask"], tokenizer)
    parts = rows or [(0, logits.shape[0])]
    total = sum(authors_loss(spec, logits[a:b], targets[a:b], mask[a:b]).sum() for a, b in parts)
    return total / mask.sum()


def loss_and_grads(trainer):
    """The trainer's loss on its first batch and the whole-model gradient it gives (the inputs too)."""
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    ours = grads(trainer.model)
    trainer.model.zero_grad()
    return inputs, loss, ours


def full_log_probs(model, inputs, tokenizer):
    """log_softmax of the model's full fp32 logits, the targets' log p and the completion mask."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1].float()
    log_probs = torch.log_softmax(logits, -1)
    log_p = log_probs.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    return log_probs, log_p, completion_mask(inputs["input_ids"], inputs["attention_mask"], tokenizer)


@pytest.mark.parametrize("spec", SPECS)
def test_trainer_loss_and_gradient_match_full_logits(tmp_path, tokenizer, spec):
    """The fused head (no [tokens x vocab] logits) trains the authors' loss: value and whole-model gradient."""
    trainer = make_trainer(tmp_path, tokenizer, spec)
    model = trainer.model
    needed = set(get_objective(spec).reads) - {"log_probs"}
    assert needed <= set(trainer.objective_hook.head_outputs)  # asked of TRL's head
    inputs, loss, ours = loss_and_grads(trainer)
    ref = model_reference(model, inputs, spec, tokenizer)
    ref.backward()
    want = grads(model)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert ((ours - want).norm() / want.norm()).item() <= 1e-4


@pytest.mark.parametrize("spec", ["deft_cayley", "deft"])
def test_gradient_accumulation_matches_micro_batch_reference(tmp_path, tokenizer, spec):
    """Two micro-batches of 4 with num_items_in_batch = the batch's target count: the sum of their gradients is the
    authors' loss with each micro-batch's own statistics, over the whole batch's tokens."""
    trainer = make_trainer(tmp_path, tokenizer, spec)
    model = trainer.model
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    count = (inputs["labels"][:, 1:] != -100).sum()
    model.zero_grad()
    for a, b in ((0, 4), (4, 8)):
        micro = {key: value[a:b] for key, value in inputs.items()}
        trainer.compute_loss(model, micro, num_items_in_batch=count).backward()
    ours = grads(model)
    model.zero_grad()
    model_reference(model, inputs, spec, tokenizer, rows=[(0, 4), (4, 8)]).backward()
    want = grads(model)
    assert ((ours - want).norm() / want.norm()).item() <= 1e-4


# ------------------------------------------------------------------------------------- the seam: one registry row


@pytest.fixture
def entropy_signal():
    """A made-up signal read from the head's entropy: 1 - mean H / ln V (how sure the model is)."""
    signal = register_signal(Signal("sureness", lambda stats: 1.0 - stats.mean_normalised_entropy, "a test signal",
                                    metric="sureness", reads=("log_probs", "entropy")))  # fmt: skip
    yield signal
    unregister_signal("sureness")


@pytest.fixture
def sum_sq_family():
    """A made-up family read from log sum_v p_v^2: NLL weighted by sg(1 - sum_v p_v^2)."""
    family = register_family(Family(
        name="unsure_nll",
        loss=lambda log_p, _, tokens: -log_p * (1 - tokens.sum_sq_probs),
        weight=lambda p, _, tokens: 1 - tokens.sum_sq_probs,
        loss_text="-log p (1 - sg(sum_v p_v^2))", weight_text="1 - sum_v p_v^2", help="a test family",
        reads=("log_probs", "log_sum_sq_probs"),
    ))  # fmt: skip
    yield family
    unregister_family("unsure_nll")


def test_a_signal_reading_entropy_is_one_registry_row(tmp_path, tokenizer, entropy_signal):
    trainer = make_trainer(tmp_path, tokenizer, "p", objective_schedule="adaptive", schedule_signal="sureness",
                           schedule_ema_decay=0.0, max_steps=2)  # fmt: skip
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    mask = completion_mask(inputs["input_ids"], inputs["attention_mask"], tokenizer)
    log_probs = torch.log_softmax(logits.float(), -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    want = 1.0 - (entropy[mask] / math.log(logits.shape[-1])).mean().item()
    trainer.train()
    first = next(e for e in trainer.state.log_history if "sureness" in e)
    assert first["sureness"] == pytest.approx(want, abs=1e-5)  # step 1's signal: the batch before its update
    assert first["schedule_signal_ema"] == pytest.approx(want, abs=1e-5)  # decay 0: the moving average is that value


def test_a_family_reading_log_sum_sq_probs_is_one_registry_row(tmp_path, tokenizer, sum_sq_family):
    trainer = make_trainer(tmp_path, tokenizer, "unsure_nll")
    assert "log_sum_sq_probs" in trainer.objective_hook.head_outputs
    model = trainer.model
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(model, dict(inputs))
    log_probs, log_p, mask = full_log_probs(model, inputs, tokenizer)
    sum_sq = (log_probs.exp() ** 2).sum(-1)
    ref = (-log_p * (1 - sum_sq) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- refused before step 1


def drop_output(trainer, name):
    """A forward that does not return ``name``: a forward hook that runs before the trainer's (accelerate may re-wrap
    ``model.forward`` itself at train time, so patching the attribute is not reliable)."""

    def without(module, args, kwargs, outputs):
        if kwargs.get("fused_lm_head"):
            setattr(outputs, name, None)
        return outputs

    trainer.model.register_forward_hook(without, with_kwargs=True, prepend=True)


@pytest.mark.parametrize(
    "spec, overrides, dropped, who",
    [
        # the bug of #20: without the warm start, a top-1 signal without is_top1 trained NLL all run, silently
        ("p", dict(objective_schedule="adaptive", schedule_warm_start_samples=0), "is_top1", "schedule_signal='sequence_top1'"),
        ("p", dict(objective_schedule="adaptive"), "is_top1", "schedule_signal='sequence_top1'"),
        ("deft", {}, "log_sum_sq_probs", "objective 'deft'"),
        ("eaft:1", {}, "entropy", "objective 'eaft:1'"),
        ("p", dict(objective_schedule="adaptive", schedule_signal="token_top1_clean", schedule_warm_start_samples=0),
         "log_sum_sq_probs", "schedule_signal='token_top1_clean'"),
    ],
)
def test_a_missing_head_output_is_refused_before_step_1(tmp_path, tokenizer, spec, overrides, dropped, who):
    trainer = make_trainer(tmp_path, tokenizer, spec, max_steps=2, **overrides)
    drop_output(trainer, dropped)
    with pytest.raises(MissingHeadOutput, match=f"{who} reads `{dropped}`"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_per_source_signal_without_its_output_is_refused_before_step_1(tmp_path, tokenizer):
    from datasets import concatenate_datasets

    data = concatenate_datasets([addition_dataset(8).add_column("source", ["add"] * 8),
                                 addition_dataset(8, seed=1).add_column("source", ["rev"] * 8)])  # fmt: skip
    args = ExperimentalSFTConfig(**base_args(tmp_path, objective="p", objective_schedule="adaptive", schedule_signal="mean",
                                     schedule_per_source=True, schedule_source_signal="rev=token_top1",
                                     schedule_warm_start_samples=0, max_steps=2))  # fmt: skip
    trainer = ProbSFTTrainer(model=random_tiny_llama(seed=1), args=args, train_dataset=data, processing_class=tokenizer)
    drop_output(trainer, "is_top1")
    with pytest.raises(MissingHeadOutput, match="schedule_source_signal\\['rev'\\]='token_top1' reads `is_top1`"):
        trainer.train()
    assert trainer.state.global_step == 0


# ------------------------------------------------------------------------------------- the new schedule candidates


def test_token_gate_blends_each_token_by_its_own_confidence(tmp_path, tokenizer):
    """token_gate: each token's lambda = clip((sum_v p_v^2 - low) / (high - low), 0, 1), from the full distribution;
    loss = mean over target tokens of (1 - lambda) (-log p) + lambda (1 - p)."""
    trainer = make_trainer(tmp_path, tokenizer, "p", objective_schedule="token_gate", schedule_ramp_low=0.05,
                           schedule_ramp_high=0.12)  # fmt: skip
    assert "log_sum_sq_probs" in trainer.objective_hook.head_outputs
    model = trainer.model
    inputs, loss, ours = loss_and_grads(trainer)
    log_probs, log_p, mask = full_log_probs(model, inputs, tokenizer)
    lam = ((log_probs.exp() ** 2).sum(-1).detach() - 0.05) / (0.12 - 0.05)
    lam = lam.clamp(0, 1)
    assert ((lam > 0) & (lam < 1) & mask).any(), "the ramp should split the tokens"
    ref = (((1 - lam) * -log_p + lam * (1 - log_p.exp())) * mask).sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert ((ours - grads(model)).norm() / grads(model).norm()).item() <= 1e-4


def test_token_gate_logs_the_steps_mean_token_lambda(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, "p", objective_schedule="token_gate", schedule_ramp_low=0.05,
                           schedule_ramp_high=0.12, max_steps=2)  # fmt: skip
    trainer.train()
    logged = [e["objective_lambda"] for e in trainer.state.log_history if "objective_lambda" in e]
    assert len(logged) == 2 and all(0.0 < lam < 1.0 for lam in logged)
    assert trainer.schedule.value == logged[-1]


class Step:
    """Stand-in statistics of one optimizer step."""

    def __init__(self, nll):
        self.nll, self.token_top1_share, self.sequence_top1_share = nll, 0.5, 0.5


def test_progress_waits_while_fresh_nll_falls_then_rises_and_holds():
    from trl_prob.experimental import ProgressSchedule

    schedule = ProgressSchedule(window=2, threshold=0.10, ema_decay=0.0, fresh_steps=8)
    assert schedule.begin(10) == 0.0
    falling = [4.0, 3.0, 2.0, 1.6]  # falls >= 10% per 2 steps: NLL
    flat = [1.55, 1.54, 1.54, 1.54]  # the fall stops: toward the objective
    after = [9.0, 9.0]  # past the first epoch (not fresh): ignored, lambda holds
    values = [schedule.step(Step(x)) for x in falling + flat + after]
    assert values[:4] == [0.0] * 4
    assert values[5] > 0.5 and values[7] == 1.0 and values[8:] == [1.0, 1.0]
    assert all(b >= a for a, b in zip(values, values[1:]))  # never decreases
    again = ProgressSchedule(window=2, threshold=0.10, ema_decay=0.0, fresh_steps=8)
    again.load_state_dict(schedule.state_dict())
    assert again.state_dict() == schedule.state_dict()


def test_a_late_linear_ramp_stays_on_nll_until_its_start():
    from trl_prob.schedules import warmup_lambda

    assert [warmup_lambda(s, 100, 0.25, start=0.5) for s in (0, 50, 55, 75, 90)] == [0.0, 0.0, 0.2, 1.0, 1.0]


# ------------------------------------------------------------------------------------- --objective auto


def test_auto_resolves_to_the_benchmarks_choice_in_one_place(tmp_path, tokenizer, caplog):
    import logging

    from trl_prob.auto import AUTO_SETTINGS, describe

    config = ExperimentalSFTConfig(**base_args(tmp_path, objective="auto"))
    for key, value in AUTO_SETTINGS.items():
        assert getattr(config, key) == get_objective(value).spec if key == "objective" else getattr(config, key) == value
    assert config.objective_auto
    with caplog.at_level(logging.INFO, logger="trl_prob"):
        ProbSFTTrainer(model=random_tiny_llama(seed=1), args=config, train_dataset=addition_dataset(8),
                       processing_class=tokenizer)  # fmt: skip
    assert describe() in caplog.text  # named in the log line at start


def test_auto_with_a_conflicting_setting_is_one_line(tmp_path):
    from trl_prob.auto import AUTO_SETTINGS

    key = next(k for k in AUTO_SETTINGS if k != "objective")
    field = ProbSFTConfig.__dataclass_fields__[key]
    other = {"objective_schedule": "constant", "schedule_signal": "mean", "schedule_token_gate": "certainty"}[key]
    assert other != AUTO_SETTINGS[key] and other != field.default
    with pytest.raises(ValueError, match=f"objective='auto' chooses {key}="):
        ExperimentalSFTConfig(**base_args(tmp_path, objective="auto", **{key: other}))
