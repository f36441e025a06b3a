"""ASFT (arXiv 2509.23753) on the fused head: -sg(p) log p + alpha KL(q_ref || p_model) per target token.

Reference: the authors' formula on full fp32 logits (the model's ordinary forward, and the base's with the adapters
disabled, or a reference model's), the KL written out as sum_v q_v (log q_v - log p_v), averaged over target tokens.
Ours: ``ProbSFTTrainer.compute_loss`` on TRL's fused head plus trl_prob/asft.py's chunked KL. The LoRA adapters start
away from zero (at PEFT's init the model is its base and the KL is 0, which would prove nothing).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import conftest
from _asft_train import adapters_enabled, perturbed_lora
from _launch import TESTS, accelerate_launch, python
from addition import random_tiny_llama
from conftest import first_batch, grads
from trl_prob import ProbSFTConfig
from trl_prob.asft import chunked_kl
from trl_prob.objectives import get_objective


def make_trainer(tmp_path, tokenizer, model, objective="asft:0.5", rows=16, **overrides):
    overrides = {"per_device_train_batch_size": 8, **overrides}
    return conftest.make_trainer(tmp_path, tokenizer, model, rows, objective=objective, **overrides)


def full_logits_loss(model, inputs, alpha, reference, lam=1.0):
    """(1 - lam) NLL + lam ASFT from full fp32 logits, the mean over target tokens, and the mean KL.
    ``reference``: a callable giving the reference's logits (no grad)."""
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    log_p_all = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
    with torch.no_grad():
        log_q_all = reference(ids, attention)[:, :-1].float().log_softmax(-1)
    targets = inputs["labels"][:, 1:]
    mask = targets != -100
    log_p = log_p_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kl = (log_q_all.exp() * (log_q_all - log_p_all)).sum(-1)
    asft = -log_p * log_p.detach().exp() + alpha * kl
    per_token = (1 - lam) * -log_p + lam * asft
    return (per_token * mask).sum() / mask.sum(), (kl * mask).sum() / mask.sum()


def disabled_adapters(model):
    def logits(ids, attention):
        was_training = model.training
        model.eval()
        with model.disable_adapter():
            out = model(input_ids=ids, attention_mask=attention).logits
        model.train(was_training)
        return out

    return logits


def assert_grads_close(ours, want, rtol=1e-3):
    assert ours.keys() == want.keys() and ours
    for name in want:
        error = ((ours[name] - want[name]).norm() / want[name].norm().clamp(min=1e-30)).item()
        assert error <= rtol, (name, error)


def assert_matches_full_logits(trainer, alpha, reference_logits, min_kl):
    """The trainer's loss and gradient on its first batch against ``full_logits_loss`` with ``reference_logits`` as q;
    returns our gradients."""
    model = trainer.model
    model.train()
    inputs = first_batch(trainer)
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    ours = grads(model)
    model.zero_grad()
    want, kl = full_logits_loss(model, inputs, alpha, reference_logits)
    want.backward()
    assert kl.item() > min_kl, f"the trained model should be off its reference: KL {kl.item()}"
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-3, atol=0)
    assert_grads_close(ours, grads(model))
    return ours


# ------------------------------------------------------------------------------------------------ the spec


def test_spec_defaults_to_the_papers_alpha():
    assert get_objective("asft").spec == "asft:0.1"
    assert get_objective("asft:0.3").param == 0.3
    assert get_objective("asft:0").param == 0.0
    with pytest.raises(ValueError, match="alpha"):
        get_objective("asft:-1")


def test_chunked_kl_matches_full_logits_with_a_bias():
    torch.manual_seed(0)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    ours = chunked_kl(hidden, weight, bias, ref_hidden, ref_weight, None)
    log_p = (hidden @ weight.T + bias).log_softmax(-1)
    log_q = (ref_hidden @ ref_weight.T).log_softmax(-1)
    want = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ours, want.float(), rtol=1e-5, atol=1e-6)
    g = torch.randn(n, dtype=torch.float64)
    got = torch.autograd.grad((ours * g).sum(), (hidden, weight, bias))
    expected = torch.autograd.grad((want * g).sum(), (hidden, weight, bias))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_chunked_divergence_passes_the_parameters_of_trls_forward(monkeypatch):
    """chunked_kl calls TRL's ChunkedDivergenceFunction (an autograd Function: positional arguments) through
    chunked_divergence, by name: the names it passes are TRL's forward's parameters, in TRL's order, so a release that
    renames, drops or reorders one fails here."""
    import inspect

    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from trl_prob.asft import DIVERGENCE_PARAMETERS, chunked_divergence

    parameters = list(inspect.signature(ChunkedDivergenceFunction.forward).parameters)
    assert parameters[0] == "ctx" and tuple(parameters[1:]) == DIVERGENCE_PARAMETERS
    seen = {}

    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
                temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None, teacher_logit_scale=1.0,
                teacher_final_logit_softcapping=None):  # fmt: skip
        seen.update(locals())
        return student_hidden, student_hidden

    class Recorder(torch.autograd.Function):
        pass

    Recorder.forward = staticmethod(forward)
    Recorder.backward = staticmethod(lambda ctx, *grads: (None,) * 12)
    named = {name: torch.zeros(1) if "hidden" in name else index for index, name in enumerate(DIVERGENCE_PARAMETERS)}
    monkeypatch.setattr("trl.kernels.chunked_divergence.ChunkedDivergenceFunction", Recorder)
    chunked_divergence(**named)
    assert {name: seen[name] for name in named if "hidden" not in name} == {
        name: value for name, value in named.items() if "hidden" not in name}  # every value in its own slot
    with pytest.raises(TypeError, match="student_logits_scale"):  # a name TRL does not have
        chunked_divergence(**named, student_logits_scale=1.0)


# ------------------------------------------------------------------------------------------------ LoRA: value and gradient


@pytest.mark.parametrize("alpha, lam", [(0.5, 1.0), (0.1, 0.5)], ids=["asft:0.5", "asft:0.1-blend-0.5"])
def test_lora_loss_and_gradient_match_full_logits_reference(tmp_path, tokenizer, alpha, lam):
    model = perturbed_lora(random_tiny_llama(seed=1))
    # the constant schedule's lambda field (objective_lambda, schedule_constant_lambda after the 2026 rename)
    fields = ProbSFTConfig.__dataclass_fields__
    lam_field = "schedule_constant_lambda" if "schedule_constant_lambda" in fields else "objective_lambda"
    extra = {"objective_schedule": "constant", lam_field: lam} if lam < 1.0 else {}
    trainer = make_trainer(tmp_path, tokenizer, model, objective=f"asft:{alpha}", **extra)
    trainer.objective_hook.begin(total_steps=1)  # lambda is the schedule's from the first step on
    assert trainer.objective_lambda == lam
    model = trainer.model
    model.train()
    inputs = first_batch(trainer)
    assert (inputs["attention_mask"] == 0).any(), "the batch should contain padding"

    # each backbone pass: grad enabled?, adapters disabled?, training mode? (the model's, then the reference's)
    lora_layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    passes = []
    backbone = trainer.asft_reference.backbone
    handle = backbone.register_forward_hook(lambda *a: passes.append(
        (torch.is_grad_enabled(), lora_layer.disable_adapters, backbone.training)))  # fmt: skip
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    handle.remove()
    ours = grads(model)
    assert passes == [(True, False, True), (False, True, False)]
    assert trainer.asft_reference.reference_passes == 1
    assert adapters_enabled(model) and backbone.training  # enabled again, train mode again, after the reference pass

    model.zero_grad()
    want, kl = full_logits_loss(model, inputs, alpha, disabled_adapters(model), lam)
    want.backward()
    assert kl.item() > 1e-3, f"the adapters should move the model off its base: KL {kl.item()}"
    assert trainer.asft_reference.step_kl() == pytest.approx(kl.item(), rel=1e-4)  # the asft_kl metric
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-3, atol=0)
    assert all("lora_" in name for name in ours)  # the reference pass left no gradient on the frozen base
    assert_grads_close(ours, grads(model))


def test_per_token_kl_lines_up_with_trls_positions_shifted_or_not(tmp_path, tokenizer):
    """Per token, the KL equals the full-logits KL at the position TRL scores: ``hidden[:, :-1]`` against
    ``labels[:, 1:]``, or, with pre-shifted ``shift_labels`` (context parallelism), every position unshifted."""
    trainer = make_trainer(tmp_path, tokenizer, perturbed_lora(random_tiny_llama(seed=1)))
    model, reference = trainer.model, trainer.asft_reference
    inputs = first_batch(trainer)
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    mask = inputs["labels"][:, 1:] != -100
    reference.active = lambda: True
    with torch.no_grad():
        reference.backbone(input_ids=ids, attention_mask=attention)
        captured = reference.take()
        kl = reference.kl(mask, captured, shifted=False)
        kl_shifted = reference.kl(torch.nn.functional.pad(mask, (0, 1)), captured, shifted=True)
        log_p = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
        log_q = disabled_adapters(model)(ids, attention)[:, :-1].float().log_softmax(-1)
    want = (log_q.exp() * (log_q - log_p)).sum(-1) * mask
    assert want[mask].min() > 0
    torch.testing.assert_close(kl, want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(kl_shifted[:, :-1], kl, rtol=1e-5, atol=1e-8)
    assert (kl_shifted[:, -1] == 0).all() and (kl[~mask] == 0).all()
    assert adapters_enabled(model)


def test_trained_head_copy_is_not_the_reference(tmp_path, tokenizer):
    """``modules_to_save=["lm_head"]``: p reads the trained copy of the head, q the original one (PEFT disables the copy
    with the adapters). TRL refuses a LoRA on lm_head itself."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    torch.manual_seed(0)
    model = peft.get_peft_model(random_tiny_llama(seed=1), config)
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(0.05 * torch.randn_like(model.get_output_embeddings().weight))
    trainer = make_trainer(tmp_path, tokenizer, model)
    ours = assert_matches_full_logits(trainer, 0.5, disabled_adapters(trainer.model), min_kl=1e-3)
    assert any("modules_to_save" in name for name in ours)
    assert adapters_enabled(trainer.model)


# ------------------------------------------------------------------------------------------------ full fine-tuning


def test_full_fine_tuning_without_a_reference_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="--ref_model_name_or_path") as error:
        make_trainer(tmp_path, tokenizer, random_tiny_llama(seed=1), objective="asft")
    assert len(str(error.value).splitlines()) == 1


def test_cli_full_fine_tuning_without_a_reference_is_one_line(tmp_path, capsys):
    from trl_prob.embedded import default_dataset_path, default_model_path

    from trl_prob import cli

    status = cli.main(["sft", "--model_name_or_path", default_model_path(), "--dataset_name", default_dataset_path(),
                       "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--output_dir", str(tmp_path),
                       "--objective", "asft", "--max_steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    # the model loads first (its progress bar may come before): the error is the one last line, no traceback
    from test_cli import stderr_lines  # progress bars (a fresh datasets cache prints some) left out

    lines = stderr_lines(err)
    assert status != 0 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("trl-prob sft: error: ") and "--ref_model_name_or_path" in lines[0], lines[0]
    assert not os.path.exists(os.path.join(tmp_path, "checkpoint-1"))


def test_reference_for_another_objective_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="ref_model_name_or_path"):
        make_trainer(tmp_path, tokenizer, random_tiny_llama(seed=1), objective="dft", ref_model_name_or_path="x")


def test_full_fine_tuning_with_a_reference_model(tmp_path, tokenizer):
    reference_dir = tmp_path / "reference"
    random_tiny_llama(seed=2).save_pretrained(reference_dir)
    trainer = make_trainer(tmp_path, tokenizer, random_tiny_llama(seed=1), objective="asft:0.5",
                           ref_model_name_or_path=str(reference_dir), max_steps=2)  # fmt: skip
    model, ref_model = trainer.model, trainer.asft_reference.ref_model
    ref_before = {name: p.detach().clone() for name, p in ref_model.named_parameters()}
    ours = assert_matches_full_logits(trainer, 0.5, lambda ids, attention: ref_model(
        input_ids=ids, attention_mask=attention).logits, min_kl=1e-2)  # fmt: skip
    assert "lm_head.weight" in ours  # the KL's gradient reaches the trained head too
    assert all(p.grad is None and not p.requires_grad for p in ref_model.parameters())

    model.zero_grad()
    trainer.train()
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 2
    for name, p in ref_model.named_parameters():
        assert torch.equal(p, ref_before[name]), f"the reference moved: {name}"


def test_reference_model_loads_with_the_runs_model_init_kwargs(tmp_path, tokenizer, monkeypatch):
    """The reference loads as TRL loads the model: the run's model_init_kwargs (revision, trust_remote_code, ...),
    in the model's dtype, unquantized and on one device."""
    reference_dir = tmp_path / "reference"
    random_tiny_llama(seed=2).save_pretrained(reference_dir)
    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, **kwargs):
        calls.append((path, kwargs))
        return real(path, dtype=kwargs["dtype"])

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    init = {"revision": "v1.0", "trust_remote_code": True, "attn_implementation": "eager", "dtype": "bfloat16",
            "device_map": "auto"}  # fmt: skip
    trainer = make_trainer(tmp_path, tokenizer, random_tiny_llama(seed=1), objective="asft:0.5",
                           ref_model_name_or_path=str(reference_dir), model_init_kwargs=init)  # fmt: skip
    assert calls == [(str(reference_dir), {"revision": "v1.0", "trust_remote_code": True,
                                           "attn_implementation": "eager", "dtype": torch.float32})]  # fmt: skip
    assert trainer.asft_reference.ref_model is not None


# ------------------------------------------------------------------------------------------------ accumulation


def test_gradient_accumulation_equals_one_large_batch(tmp_path, tokenizer):
    """One SGD step over 8 rows: 2 micro-batches of 4 with accumulation == one batch of 8 (TRL divides the summed
    per-token loss, KL included, by the step's target-token count)."""

    def step(per_device, accumulation):
        model = perturbed_lora(random_tiny_llama(seed=1))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        trainer = make_trainer(tmp_path / f"ga{accumulation}", tokenizer, model, objective="asft:1", rows=8,
                               per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                               max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant")  # fmt: skip
        trainer.train()
        assert trainer.asft_reference.reference_passes == accumulation
        return torch.cat([(p.detach() - before[n]).flatten() for n, p in trainer.model.named_parameters() if n in before])

    one, accumulated = step(8, 1), step(4, 2)
    assert one.norm() > 0
    assert ((accumulated - one).norm() / one.norm()).item() <= 1e-3


# ------------------------------------------------------------------------------------------------ checkpoints


def test_resume_continues_like_an_uninterrupted_run(tmp_path, tokenizer):
    def run(output, max_steps, resume=None):
        model = perturbed_lora(random_tiny_llama(seed=1))
        trainer = make_trainer(tmp_path, tokenizer, model, output_dir=str(output), max_steps=max_steps,
                               per_device_train_batch_size=4, save_strategy="steps", save_steps=2)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        lora = torch.cat([p.detach().flatten() for n, p in trainer.model.named_parameters() if "lora_" in n])
        return lora, {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}

    straight, straight_losses = run(tmp_path / "straight", 3)
    resumed, resumed_losses = run(tmp_path / "resumed", 3, resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert resumed_losses[3] == pytest.approx(straight_losses[3], rel=1e-5)
    torch.testing.assert_close(resumed, straight, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ 2 processes == 1


def test_two_processes_match_one_process(tmp_path):
    script = os.path.join(TESTS, "_asft_train.py")
    python(script, tmp_path / "one.json", "asft:0.5", 4, 2, timeout=240, check=True)
    accelerate_launch("--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", 0, script, tmp_path / "two.json", "asft:0.5", 2,
                      2, timeout=240, env={"ACCELERATE_USE_CPU": "1"}, check=True)  # fmt: skip

    one, two = (json.load(open(tmp_path / name)) for name in ("one.json", "two.json"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["adapters_enabled"] and two["adapters_enabled"]
    assert len(one["logs"]) == len(two["logs"]) == 2
    for a, b in zip(one["logs"], two["logs"]):
        for key in ("loss", "mean_token_prob", "nll", "grad_norm", "asft_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
        assert a["asft_kl"] > 1e-3  # the perturbed adapters: a real KL, all-reduced over the two ranks
    # evaluation ran through the KL too (its loss is a mean of per-batch means, which the batch split changes: the
    # per-sample statistics are compared, as in test_training.py)
    for key in ("eval_mean_token_prob", "eval_nll"):
        assert two["evaluation"][key] == pytest.approx(one["evaluation"][key], rel=1e-4), key
    assert one["reference_passes"] == two["reference_passes"] == 2 + 2  # one per micro-batch: 2 steps, 2 eval batches
    torch.testing.assert_close(torch.tensor(two["lora"]), torch.tensor(one["lora"]), rtol=1e-4, atol=1e-5)
