"""Per-source schedules on a `datasets:` mixture (`trl-prob sft` / `probe`): each entry's rows are named after it, the
mixture is TRL's own row for row (`fraction` and `test_split_size` included), data that name their sources keep them,
and bad input is one line before training. Offline, in-process, seconds each."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from trl import DatasetMixtureConfig, get_dataset  # noqa: E402

from addition import make_addition_examples  # noqa: E402
from trl_prob import cli  # noqa: E402
from trl_prob.embedded import default_model_path  # noqa: E402
from trl_prob.experimental.sources import load_mixture  # noqa: E402

CPU = ["--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none",
       "--disable_tqdm", "true", "--schedule_warm_start_samples", "16"]  # fmt: skip
PER_SOURCE = ["--experimental", "--objective", "p", "--objective_schedule", "adaptive", "--schedule_per_source", "true"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def addition_rows(n: int, seed: int, noise: float = 0.0, **extra) -> list[dict]:
    return [{"prompt": row["prompt"], "completion": row["completion"], **extra}
            for row in make_addition_examples(n, noise=noise, seed=seed, format="prompt_completion")]  # fmt: skip


@pytest.fixture
def two_files(tmp_path):
    """math.jsonl (7 rows) and medical.jsonl (11 rows), each row saying in `file` which file it is from."""
    return [write_jsonl(tmp_path / "math.jsonl", addition_rows(7, seed=1, file="math")),
            write_jsonl(tmp_path / "medical.jsonl", addition_rows(11, seed=2, noise=1.0, file="medical"))]  # fmt: skip


def mixture(files, fractions=None, test_split_size=None, **entry) -> DatasetMixtureConfig:
    entries = [dict(path="json", data_files=path, **entry) for path in files]
    for config, fraction in zip(entries, fractions or ()):
        config["fraction"] = fraction
    return DatasetMixtureConfig(datasets=entries, test_split_size=test_split_size)


@pytest.mark.parametrize("fractions", [None, (0.25, 0.75)], ids=["whole", "fraction"])
@pytest.mark.parametrize("test_split_size", [None, 0.25], ids=["no-split", "split"])
def test_tagged_mixture_is_trls_mixture_row_by_row(two_files, fractions, test_split_size):
    config = mixture(two_files, fractions, test_split_size)
    np.random.seed(0)  # train_test_split draws its seed from numpy's global generator
    expected = get_dataset(config)
    np.random.seed(0)
    tagged = load_mixture(config, "source")

    assert list(tagged) == list(expected)
    for split in expected:
        assert tagged[split].remove_columns("source").to_list() == expected[split].to_list()
        assert tagged[split]["source"] == tagged[split]["file"]
    if fractions:  # 11 / 0.75 rows in all at most: 4 of math, 11 of medical
        assert sum(len(split) for split in expected.values()) == 15


def test_data_that_name_their_sources_keep_them(tmp_path, two_files):
    named = write_jsonl(tmp_path / "named.jsonl", addition_rows(4, seed=3, file="named") + addition_rows(2, seed=4, file="x"))
    rows = [dict(row, source=row["file"]) for row in map(json.loads, open(named))]
    write_jsonl(tmp_path / "named.jsonl", rows)
    tagged = load_mixture(mixture([two_files[0], str(tmp_path / "named.jsonl")]), "source")["train"]
    assert tagged["source"] == ["math"] * 7 + ["named"] * 4 + ["x"] * 2


def test_two_entries_with_one_name_are_refused(tmp_path, two_files):
    (tmp_path / "again").mkdir()
    again = write_jsonl(tmp_path / "again" / "math.jsonl", addition_rows(3, seed=5, file="math"))
    with pytest.raises(ValueError, match=r"datasets\[0\] \(json, data_files .*math.jsonl\) and datasets\[2\] "
                       r"\(json, data_files .*again/math.jsonl\) both have the source name 'math'"):  # fmt: skip
        load_mixture(mixture([*two_files, again]), "source")
    # a `name:` tells them apart
    config = mixture([*two_files, again])
    config.datasets[2].name = "more-math"
    assert load_mixture(config, "source")["train"]["source"][-3:] == ["more-math"] * 3


def test_columns_that_drop_the_source_column_are_refused(two_files):
    with pytest.raises(ValueError, match=r"datasets\[0\] .* drop the source column 'file' its data carry"):
        load_mixture(mixture(two_files, columns=["prompt", "completion"]), "file")
    kept = load_mixture(mixture(two_files, columns=["prompt", "completion", "file"]), "file")["train"]
    assert kept.column_names == ["prompt", "completion", "file"]


# ----------------------------------------------------------------------------------------------- the command line


def config_file(tmp_path, files, **mixture_keys) -> str:
    entry = mixture_keys.pop("entry", {})
    entries = [{"path": "json", "data_files": path, **entry} for path in files]
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump({"datasets": entries, **mixture_keys}))
    return str(path)


def run(command, tmp_path, files, *flags, **mixture_keys) -> tuple[int, str]:
    argv = [command, "--config", config_file(tmp_path, files, **mixture_keys), "--model_name_or_path",
            default_model_path(), "--output_dir", str(tmp_path / "run"), *CPU, *flags]  # fmt: skip
    return cli.worker_main(argv), str(tmp_path / "run")


def error_line(capsys, status) -> str:
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if "trl-prob sft: error:" in line]
    assert len(lines) == 1, err[-3000:]  # datasets' "Generating train split" progress may come before it
    return lines[0]


def test_sft_on_a_mixture_trains_a_schedule_per_entry(tmp_path, two_files):
    status, output_dir = run("sft", tmp_path, two_files, *PER_SOURCE, "--max_steps", "2",
                             "--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_strategy", "no")  # fmt: skip
    assert status == 0
    logged = json.load(open(os.path.join(output_dir, "trainer_state.json")))["log_history"]
    for name in ("math", "medical"):
        assert any(f"objective_lambda/{name}" in entry and f"mean_token_prob/{name}" in entry for entry in logged)


def test_probe_on_a_mixture_reports_each_entry(tmp_path, two_files):
    status, output_dir = run("probe", tmp_path, two_files, *PER_SOURCE, "--num_samples", "6",
                             entry={"fraction": 0.5})  # fmt: skip
    assert status == 0
    report = json.load(open(os.path.join(output_dir, "probe.json")))
    # fraction 0.5 / 0.5: 7 rows of each; the probe's 6 samples are 3 of each, not the first 6 (all math)
    assert {name: entry["num_samples"] for name, entry in report["sources"].items()} == {"math": 3, "medical": 3}
    assert report["sources"]["math"]["mean_p"] > report["sources"]["medical"]["mean_p"]  # medical: every answer wrong


def test_columns_dropping_the_source_column_is_one_line(tmp_path, capsys, two_files):
    status, output_dir = run("sft", tmp_path, two_files, *PER_SOURCE, "--source_column", "file",
                             entry={"columns": ["prompt", "completion"]})  # fmt: skip
    line = error_line(capsys, status)
    assert "datasets[0] (json, data_files" in line and "drop the source column 'file' its data carry" in line
    assert not os.path.exists(output_dir)


def test_unknown_source_in_schedule_source_lambda_is_one_line(tmp_path, capsys, two_files):
    status, output_dir = run("sft", tmp_path, two_files, *PER_SOURCE, "--schedule_source_lambda", "maths=0")
    line = error_line(capsys, status)
    assert line.endswith("schedule_source_lambda names unknown source(s) 'maths'; the sources are 'math', 'medical'.")
    assert not os.path.exists(output_dir)


def test_without_per_source_the_mixture_is_left_as_trl_loads_it(tmp_path, two_files):
    status, output_dir = run("probe", tmp_path, two_files, "--num_samples", "4")
    assert status == 0
    assert json.load(open(os.path.join(output_dir, "probe.json")))["sources"] == {}
