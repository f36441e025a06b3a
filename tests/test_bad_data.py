"""Bad training data is one line on stderr before training, naming the row (or file and line) and the field: an empty
or whitespace-only completion, a missing key, zero rows, a non-UTF-8 file, a non-JSON line, a conversation without an
assistant turn; a prompt longer than max_length is one warning line naming the row and what truncation does to it.
Nothing is written to --output_dir."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from conftest import base_args  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_prob import ProbSFTConfig, ProbSFTTrainer, cli  # noqa: E402
from trl_prob.data import DataError  # noqa: E402
from trl_prob.embedded import default_model_path  # noqa: E402

GOOD = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (10, 20), (11, 22)]]


def chat(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def write(tmp_path, rows=None, raw: bytes | None = None):
    data = tmp_path / "data"
    data.mkdir()
    if raw is None:
        raw = "".join(json.dumps(row) + "\n" for row in rows).encode()
    (data / "train.jsonl").write_bytes(raw)
    return data


def error_line(capsys, tmp_path, data, *flags) -> str:
    output_dir = tmp_path / "run"
    status = cli.worker_main(["sft", "--model_name_or_path", default_model_path(), "--dataset_name", str(data),
                              "--output_dir", str(output_dir), "--use_cpu", "true", "--bf16", "false", "--report_to",
                              "none", "--max_steps", "1", "--disable_tqdm", "true", *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if "trl-prob sft: error:" in line]
    assert len(lines) == 1, err[-3000:]  # datasets' "Generating train split" progress may come before it
    assert not output_dir.exists()  # before training: nothing written
    return lines[0]


def with_row(index: int, **row) -> list[dict]:
    rows = [dict(r) for r in GOOD]
    rows[index] = row
    return rows


def test_empty_or_whitespace_completion(capsys, tmp_path):
    line = error_line(capsys, tmp_path, write(tmp_path, with_row(3, prompt="5+6=", completion="  ")))
    assert "'train' row 3: 'completion' is empty or whitespace only ('  ')" in line


def test_missing_key(capsys, tmp_path):
    line = error_line(capsys, tmp_path, write(tmp_path, with_row(2, prompt="5+6=")))
    assert "'train' row 2: no 'completion' (the key is missing or null)" in line


def test_zero_rows(capsys, tmp_path):
    data = write(tmp_path, raw=b"")
    line = error_line(capsys, tmp_path, data)
    assert f"{data / 'train.jsonl'} holds no rows" in line


def test_non_utf8_file(capsys, tmp_path):
    raw = "".join(json.dumps(row) + "\n" for row in GOOD).encode().replace(b'"3+4="', b'"3+4=\xff"')
    line = error_line(capsys, tmp_path, write(tmp_path, raw=raw))
    assert "'train' row 1: 'prompt' is not valid UTF-8" in line and "train.jsonl line 2: not UTF-8" in line


def test_non_json_line(capsys, tmp_path):
    lines = [json.dumps(row) for row in GOOD]
    lines[4] = lines[4][:-1]  # the closing brace lost
    line = error_line(capsys, tmp_path, write(tmp_path, raw="\n".join(lines).encode()))
    assert "train.jsonl line 5: not JSON" in line


@pytest.mark.parametrize("layout", ["messages", "prompt_completion"])
def test_conversation_without_an_assistant_turn(capsys, tmp_path, layout):
    if layout == "messages":
        rows = [{"messages": chat(row)} for row in GOOD]
        rows[1]["messages"] = rows[1]["messages"][:1]
        field, row = "messages", 1
    else:
        rows = [{"prompt": chat(row)[:1], "completion": chat(row)[1:]} for row in GOOD]
        rows[4]["completion"] = [{"role": "user", "content": "and now?"}]
        field, row = "completion", 4
    line = error_line(capsys, tmp_path, write(tmp_path, rows))
    assert f"'train' row {row}: '{field}' has no assistant turn" in line


def test_bad_rows_are_refused_by_the_trainer_too(tmp_path, tokenizer, tiny_model):
    """The Python API checks the same rows, before TRL prepares (or silently trains on) them."""
    rows = with_row(2, prompt="5+6=", completion="")
    with pytest.raises(DataError, match=r"train row 2: 'completion' is empty"):
        ProbSFTTrainer(model=tiny_model, args=ProbSFTConfig(**base_args(tmp_path)), processing_class=tokenizer,
                       train_dataset=Dataset.from_list(rows))  # fmt: skip


def test_prompt_longer_than_max_length_names_the_row_and_what_truncation_does(tmp_path, tokenizer, tiny_model, caplog):
    rows = with_row(5, prompt="1+" * 40 + "1=", completion="41")
    with caplog.at_level(logging.WARNING, logger="trl_prob"):
        trainer = ProbSFTTrainer(model=tiny_model, args=ProbSFTConfig(**base_args(tmp_path, max_length=32)),
                                 processing_class=tokenizer, train_dataset=Dataset.from_list(rows))  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert len(said) == 1, said
    # 82 characters and <bos>: 83 tokens; keep_start keeps the prompt's first 32, no completion token, TRL drops it
    assert "leaves 1 more without any completion token (TRL drops them; row 5: its 'prompt' alone is 83 tokens, " \
           "and truncation_mode='keep_start' keeps only its first 32)" in said[0]  # fmt: skip
    assert len(trainer.train_dataset) == 5
