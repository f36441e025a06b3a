"""The end-of-training summary (`trl_prob.summary`, `trl-prob sft --summary true`): its exact match agrees with an
independent string-level scorer, it records lambda's first and last value, it leaves training untouched, and data it
cannot measure is refused before training."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from conftest import addition_dataset, base_args  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from addition import exact_match_accuracy, mean_target_probability  # noqa: E402
from trl_prob import ProbSFTConfig, ProbSFTTrainer  # noqa: E402
from trl_prob.embedded import default_dataset_path, default_model_path  # noqa: E402
from trl_prob.summary import RunSummary, SummaryError, exact_match  # noqa: E402


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def held_out():
    return load_dataset(default_dataset_path())["test"].select(range(60))


def trainer_on(tmp_path, held_out, tokenizer, **overrides):
    args = ProbSFTConfig(**base_args(tmp_path, **{"per_device_eval_batch_size": 16, **overrides}))
    return ProbSFTTrainer(model=AutoModelForCausalLM.from_pretrained(default_model_path()), args=args,
                          train_dataset=addition_dataset(), eval_dataset=held_out, processing_class=tokenizer)  # fmt: skip


@pytest.mark.parametrize("fmt", ["prompt_completion", "conversational"])
def test_exact_match_agrees_with_a_string_level_scorer(tmp_path, shipped_tokenizer, fmt):
    """Token-level exact match on TRL's prepared samples (prompt = tokens before the target, reference = target
    tokens with the end token) equals addition.py's: decode the greedy completion, compare it with the clean answer."""
    rows = [dict(row) for row in load_dataset(default_dataset_path())["test"].select(range(60))]
    if fmt == "conversational":
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}], "answer": r["answer"]}
                for r in rows]  # fmt: skip
    trainer = trainer_on(tmp_path, Dataset.from_list(rows), shipped_tokenizer)
    expected = exact_match_accuracy(trainer.model, shipped_tokenizer, rows)
    assert 0.3 < expected < 1.0  # the shipped model gets some right and some wrong: a real comparison
    assert exact_match(trainer, trainer.eval_dataset, batch_size=7) == pytest.approx(expected)
    # the summary's one-pass form: every target token top-1 under teacher forcing is greedy exact match
    teacher_forced = trainer.measure_token_probs(trainer.eval_dataset, progress=False).sequence_top1_share
    assert teacher_forced == pytest.approx(expected)


def test_summary_records_before_after_and_lambda_without_changing_training(tmp_path, shipped_tokenizer, held_out):
    common = dict(objective="p", objective_schedule="adaptive", schedule_ramp_low=0.6, schedule_ramp_high=0.95,
                  schedule_warm_start_samples=16, max_steps=4)  # fmt: skip
    plain = trainer_on(tmp_path / "plain", held_out, shipped_tokenizer, **common)
    plain.train()

    trainer = trainer_on(tmp_path / "summary", held_out, shipped_tokenizer, **common)
    summary = RunSummary(trainer, num_samples=40, print_at_end=False)
    trainer.add_callback(summary)
    trainer.train()

    # measuring before and after draws no RNG and leaves the model in train mode: the same trajectory
    losses = [(e["step"], e["loss"], e["objective_lambda"]) for e in trainer.state.log_history if "loss" in e]
    assert losses == [(e["step"], e["loss"], e["objective_lambda"]) for e in plain.state.log_history if "loss" in e]

    result = summary.result
    assert result["num_samples"] == 40
    assert result["before"]["step"] == 0 and result["after"]["step"] == 4
    rows = [dict(r) for r in held_out.select(range(40))]
    assert result["after"]["exact_match"] == pytest.approx(exact_match_accuracy(trainer.model, shipped_tokenizer, rows))
    assert result["after"]["mean_token_prob"] == pytest.approx(
        mean_target_probability(trainer.model, shipped_tokenizer, rows), abs=1e-5
    )
    logged = [e["objective_lambda"] for e in trainer.state.log_history if "objective_lambda" in e]
    assert (result["lambda"]["first"]["step"], result["lambda"]["last"]["step"]) == (1, 4)
    assert result["lambda"]["first"]["value"] == pytest.approx(logged[0])
    assert result["lambda"]["last"]["value"] == pytest.approx(logged[-1])
    text = summary.format(output_dir=str(tmp_path / "summary" / "run"), plot="training.png")
    for line in ("exact match", "mean target p", "lambda", "model", "checkpoints", "plot"):
        assert line in text


def test_data_the_summary_cannot_measure_is_refused_before_training(tmp_path, shipped_tokenizer):
    text_only = Dataset.from_list([{"text": "12+30=42"}] * 8)  # no prompt/completion: nothing to generate
    trainer = trainer_on(tmp_path, text_only, shipped_tokenizer)
    with pytest.raises(SummaryError, match="prompt-completion"):
        RunSummary(trainer)
    trainer = trainer_on(tmp_path, None, shipped_tokenizer)
    with pytest.raises(SummaryError, match="held-out split"):
        RunSummary(trainer)
