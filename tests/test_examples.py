"""The examples run offline on the embedded default, as a user would copy them (a few steps each, in-process)."""

from __future__ import annotations

import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_python_api(tmp_path, capsys):
    load_example("train_python_api").main(["--max_steps", "3", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "exact match on the clean test split:" in out and "final objective_lambda:" in out
    assert (tmp_path / "model.safetensors").is_file()


def test_custom_trainer_mixin(tmp_path, capsys):
    example = load_example("custom_trainer_mixin")
    assert example.MyProbSFTTrainer.__mro__[1:3] == (example.ProbObjectiveMixin, example.MySFTTrainer)
    example.main(["--max_steps", "4", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "4 batches through MySFTTrainer.training_step; final lambda 1.00" in out  # linear ramp done at step 2
    assert "step 2: lambda" in out


def test_qlora(tmp_path, capsys):
    load_example("qlora").main(["--max_steps", "2", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "trainable params" in out and "reloaded PeftModelForCausalLM" in out
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.parametrize("template", ["plain", "llama3"])
def test_prepare_m23k(tmp_path, template):
    source = tmp_path / "m23k.jsonl"
    rows = [
        {"prompt": "Which vitamin deficiency causes scurvy?\nA. A\nB. C", "reasoning": "Collagen needs vitamin C.",
         "distilled_answer_string": "Scurvy is vitamin C deficiency. \\boxed{B}", "answer_letter": "B",
         "answer_string": "C", "text": "<|im_start|>..."},
    ] * 3  # fmt: skip
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    load_example("prepare_m23k").main(["--source", str(source), "--out", str(tmp_path / "out"), "--template", template])

    written = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert len(written) == 3 and set(written[0]) == {"prompt", "completion"}
    assert "Which vitamin deficiency causes scurvy?" in written[0]["prompt"]
    assert written[0]["prompt"].rstrip().endswith(("Answer:", "<|end_header_id|>"))
    assert written[0]["completion"] == "Scurvy is vitamin C deficiency. \\boxed{B}"


def test_prepare_m23k_as_messages(tmp_path):
    source = tmp_path / "m23k.jsonl"
    row = {"prompt": "Which vitamin deficiency causes scurvy?\nA. A\nB. C", "reasoning": "Collagen needs vitamin C.",
           "distilled_answer_string": "Scurvy is vitamin C deficiency. \\boxed{B}"}  # fmt: skip
    source.write_text(json.dumps(row) + "\n")
    load_example("prepare_m23k").main(["--source", str(source), "--out", str(tmp_path / "out"), "--format", "messages"])

    written = json.loads((tmp_path / "out" / "train.jsonl").read_text())
    assert written == {"messages": [{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": row["distilled_answer_string"]}]}  # fmt: skip

