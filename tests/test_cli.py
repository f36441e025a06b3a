"""`trl-prob`: help, how flags are split between the trainer and accelerate, one-line errors for bad input, and end to
end runs through the real console script (one process, and two CPU processes that must agree on the schedule).

Multi-process and end-to-end runs are subprocesses under a timeout, so a hung rank fails the test instead of CI."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from trl_prob import cli  # noqa: E402
from trl_prob.embedded import default_dataset_path, default_model_path  # noqa: E402

from _launch import fail, run  # noqa: E402  (tests/_launch.py: how the tests start trl-prob)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart.yaml")
# Flags that keep a run on the embedded default tiny and quick.
TINY = [
    "--model_name_or_path", default_model_path(),
    "--dataset_name", default_dataset_path(),
    "--use_cpu", "true",
    "--bf16", "false",
    "--gradient_checkpointing", "false",
    "--report_to", "none",
    "--per_device_train_batch_size", "8",
    "--schedule_warm_start_samples", "16",
    "--disable_tqdm", "true",
]  # fmt: skip


class FakeLaunch:
    """Stands in for accelerate's `launch_command`: records what would have been launched."""

    def __init__(self):
        self.namespace = None

    def __call__(self, namespace):
        self.namespace = namespace


def launched(argv, command="sft"):
    fake = FakeLaunch()
    assert cli.launch(command, argv, launch_command_fn=fake) == 0
    return fake.namespace


# ----------------------------------------------------------------------------------------------------- help


def test_top_level_help_lists_commands_and_our_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("sft", "probe", "plot", "--objective_schedule", "--schedule_ramp_high", "--overwrite_output_dir",
                 "Per-token objective", "power:a", "--accelerate_config"):  # fmt: skip
        assert text in out
    # the objective's help in full, as ProbSFTConfig (its registry) writes it
    import dataclasses

    from trl_prob import ProbSFTConfig

    (objective,) = [f for f in dataclasses.fields(ProbSFTConfig) if f.name == "objective"]
    assert " ".join(objective.metadata["help"].split()) in " ".join(out.split())


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage: trl-prob" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["sft", "probe"])
def test_command_help_has_trl_sft_flags_and_ours(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: trl-prob {command}" in out
    # `trl sft`'s own flags (ScriptArguments, SFTConfig, ModelConfig) ...
    for flag in ("--dataset_name", "--learning_rate", "--completion_only_loss", "--load_in_4bit", "--lora_r"):
        assert flag in out
    # ... ours, with their help text, and a word on the accelerate flags
    assert "--objective" in out and "How training moves from NLL toward `objective`" in out
    assert "--schedule_warm_start_samples" in out
    assert "go to `accelerate launch`" in out
    if command == "probe":
        assert "--num_samples" in out and "--batch_size" in out


# ----------------------------------------------------------------------------------------------------- launching


def test_flags_are_split_between_accelerate_and_training(tmp_path):
    argv = [*TINY, "--output_dir", str(tmp_path / "run"), "--objective", "power:10", "--objective_schedule",
            "adaptive", "--num_processes", "2", "--multi_gpu", "--main_process_port", "29555"]  # fmt: skip
    namespace = launched(argv)
    assert namespace.multi_gpu is True and namespace.num_processes == 2 and namespace.main_process_port == 29555
    assert namespace.module is True and namespace.training_script == "trl_prob.cli"
    command, *script_args = namespace.training_script_args
    assert command == "sft"
    assert script_args == argv[: argv.index("--num_processes")]  # ours and TRL's, in order; accelerate's removed


def test_accelerate_config_names_and_recipe_configs_resolve(tmp_path):
    namespace = launched([*TINY, "--output_dir", str(tmp_path / "a"), "--accelerate_config", "multi_gpu"])
    assert namespace.config_file.endswith(os.path.join("accelerate_configs", "multi_gpu.yaml"))
    ours = os.path.join(ROOT, "recipes", "accelerate", "fsdp2.yaml")
    namespace = launched([*TINY, "--output_dir", str(tmp_path / "b"), "--accelerate_config", ours])
    assert namespace.config_file == ours


def test_one_process_launch_passes_accelerate_its_defaults(tmp_path, monkeypatch):
    """So that accelerate does not print "values were not passed to `accelerate launch`" on every run; a multi-process
    launch is left to accelerate."""
    import accelerate.commands.config

    monkeypatch.setattr(accelerate.commands.config, "default_config_file", str(tmp_path / "none.yaml"))
    monkeypatch.setattr(cli, "_accelerator_count", lambda: 0)
    namespace = launched([*TINY, "--output_dir", str(tmp_path / "a")])
    assert (namespace.num_processes, namespace.num_machines, namespace.mixed_precision, namespace.dynamo_backend) == (
        1, 1, "no", "no")  # fmt: skip
    namespace = launched([*TINY, "--output_dir", str(tmp_path / "b"), "--mixed_precision", "bf16"])
    assert namespace.mixed_precision == "bf16"
    namespace = launched([*TINY, "--output_dir", str(tmp_path / "c"), "--multi_gpu", "--num_processes", "2"])
    assert namespace.num_machines is None and namespace.mixed_precision is None


def test_the_bitsandbytes_kernel_warning_is_held_back_unless_the_run_uses_it(tmp_path, caplog):
    """bitsandbytes logs a CPU kernel warning on import, which every run triggers (transformers imports peft, peft
    imports bitsandbytes): the entry points hold it back on bitsandbytes' own logger, and log it for a run that uses
    bitsandbytes."""
    import logging

    def uses(*flags) -> bool:
        _, training_args, model_args, *_ = cli.parse("sft", [*TINY, "--output_dir", str(tmp_path), *flags])
        return cli.needs_bitsandbytes(model_args, training_args)

    assert not uses()
    assert uses("--load_in_4bit", "true")
    assert uses("--load_in_8bit", "true")
    assert uses("--optim", "paged_adamw_8bit")

    bnb_logger = logging.getLogger(cli.BNB_KERNEL_LOGGER)
    with caplog.at_level(logging.WARNING), cli.HeldKernelWarning() as held:
        caplog.clear()  # the real import (by `cli.parse` above) logged it, with no entry point to hold it back
        bnb_logger.warning("%s from kernels-community: No module named 'kernels'", cli.BNB_KERNEL_WARNING)
        bnb_logger.warning("another bitsandbytes warning")
        assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
        held.release()  # a run that uses bitsandbytes
        assert caplog.records[-1].getMessage().startswith(cli.BNB_KERNEL_WARNING)
    assert not bnb_logger.filters  # the filter lives only as long as the entry point


def test_config_file_is_forwarded_to_every_rank(tmp_path):
    namespace = launched(["--config", QUICKSTART, *TINY, "--output_dir", str(tmp_path / "run")])
    assert namespace.training_script_args[:3] == ["sft", "--config", QUICKSTART]


def test_probe_is_launched_like_sft(tmp_path):
    namespace = launched([*TINY, "--output_dir", str(tmp_path), "--num_samples", "64"], command="probe")
    assert namespace.training_script_args[0] == "probe" and "--num_samples" in namespace.training_script_args


# ----------------------------------------------------------------------------------------------------- bad input


def test_unknown_flag(capsys, tmp_path):
    status, err = fail(capsys, ["sft", *TINY, "--output_dir", str(tmp_path / "run"), "--lerning_rate", "1e-4"])
    assert status == 2 and "unrecognized arguments: --lerning_rate" in err
    assert not (tmp_path / "run").exists()


def test_bad_objective(capsys, tmp_path):
    _, err = fail(capsys, ["sft", *TINY, "--output_dir", str(tmp_path), "--objective", "power:-1"])
    assert "objective" in err.lower()


def test_bad_schedule_choice(capsys, tmp_path):
    status, err = fail(capsys, ["sft", *TINY, "--output_dir", str(tmp_path), "--objective", "p",
                                "--objective_schedule", "sometimes"])  # fmt: skip
    assert status == 1 and "Unknown objective_schedule 'sometimes'; allowed: none, constant, linear, adaptive" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_bad_value_type(capsys, tmp_path):
    status, err = fail(capsys, ["sft", *TINY, "--output_dir", str(tmp_path), "--max_steps", "many"])
    assert status == 2 and "--max_steps" in err


def test_missing_model_path(capsys, tmp_path):
    _, err = fail(capsys, ["sft", *TINY, "--output_dir", str(tmp_path), "--model_name_or_path", str(tmp_path / "no")])
    assert "--model_name_or_path" in err and "no such directory" in err


def test_model_not_given(capsys, tmp_path):
    _, err = fail(capsys, ["sft", "--dataset_name", default_dataset_path(), "--use_cpu", "true",
                           "--output_dir", str(tmp_path)])  # fmt: skip
    assert "--model_name_or_path is required" in err


def test_hub_model_unreachable_offline(capsys, tmp_path):
    _, err = fail(capsys, ["sft", *TINY, "--output_dir", str(tmp_path), "--model_name_or_path", "nobody/no-model"])
    assert "nobody/no-model" in err


def test_missing_dataset_path(capsys, tmp_path):
    _, err = fail(capsys, ["sft", *TINY, "--output_dir", str(tmp_path), "--dataset_name", str(tmp_path / "nodata")])
    assert "no such file or directory" in err


def test_dataset_not_given(capsys, tmp_path):
    _, err = fail(capsys, ["sft", "--model_name_or_path", default_model_path(), "--use_cpu", "true",
                           "--output_dir", str(tmp_path)])  # fmt: skip
    assert "Give a dataset" in err


def test_missing_config_file(capsys, tmp_path):
    _, err = fail(capsys, ["sft", "--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in err


def test_output_dir_with_a_run_is_refused_and_left_untouched(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10, "max_steps": 20}))
    (run / "model.safetensors").write_bytes(b"weights of an earlier run")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    _, err = fail(capsys, ["sft", *TINY, "--output_dir", str(run)])
    assert "already holds a run" in err and "--overwrite_output_dir" in err

    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert (run / "model.safetensors").read_bytes() == b"weights of an earlier run"
    # what the user can do instead
    assert launched([*TINY, "--output_dir", str(run), "--overwrite_output_dir"]) is not None
    assert launched([*TINY, "--output_dir", str(run), "--resume_from_checkpoint", "true"]) is not None


def test_output_dir_without_a_run_is_fine(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    assert launched([*TINY, "--output_dir", str(tmp_path)]) is not None


def test_resume_without_checkpoint(capsys, tmp_path):
    _, err = fail(capsys, ["sft", *TINY, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"])
    assert "no checkpoint-* folder" in err


ADAPTIVE = ["--objective", "p", "--objective_schedule", "adaptive"]


def _checkpoint(tmp_path, trainer_state: str | None):
    checkpoint = tmp_path / "run" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    if trainer_state is not None:
        (checkpoint / "trainer_state.json").write_text(trainer_state)
    return checkpoint


def test_resume_from_a_checkpoint_without_schedule_state_is_one_line(capsys, tmp_path):
    checkpoint = _checkpoint(tmp_path, json.dumps({"global_step": 4, "stateful_callbacks": {}}))
    argv = [*TINY, *ADAPTIVE, "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", "true"]
    _, err = fail(capsys, ["sft", *argv])
    assert "checkpoint-4 has no schedule state" in err and "--schedule_reset_on_resume" in err
    assert launched([*argv, "--schedule_reset_on_resume"]) is not None
    assert launched([*TINY, "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", str(checkpoint)])


@pytest.mark.parametrize(
    "trainer_state, message",
    [
        # cut short, as a run killed while writing it leaves it: an incomplete checkpoint
        ('{"stateful_callbacks": {"ProbObjectiveSch', "an incomplete checkpoint (trainer_state.json is cut short"),
        (json.dumps({"stateful_callbacks": {"ProbObjectiveSchedule": {"args": {}, "attributes": {"schedule": {
            "step": 4, "p_ema": "high", "objective_lambda": 0.5}}}}}), "p_ema must be null or a number in [0, 1], got 'high'"),
    ],
)
def test_resume_from_a_corrupt_schedule_state_is_one_line(capsys, tmp_path, trainer_state, message):
    checkpoint = _checkpoint(tmp_path, trainer_state)
    _, err = fail(capsys, ["sft", *TINY, *ADAPTIVE, "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint",
                           str(checkpoint)])  # fmt: skip
    assert "checkpoint-4" in err and message in err


def test_existing_run_is_refused_by_the_worker_too(capsys, tmp_path):
    """`accelerate launch -m trl_prob.cli sft ...` skips the launcher: the worker checks before touching anything."""
    (tmp_path / "trainer_state.json").write_text("{}")
    assert cli.worker_main(["sft", *TINY, "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("trl-prob sft: error:") and "already holds a run" in err
    assert (tmp_path / "trainer_state.json").read_text() == "{}"


def test_missing_split_is_one_line_from_the_worker(capsys, tmp_path):
    status = cli.worker_main(["sft", *TINY, "--output_dir", str(tmp_path / "run"), "--dataset_train_split", "nosuch"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and "Traceback" not in err
    # Only the error line: datasets' "Generating ... split" progress bars may precede it on a cold cache.
    assert err.splitlines()[-1] == (
        "trl-prob sft: error: --dataset_train_split nosuch: the dataset has no such split (it has: train, test)."
    )


def test_plot_missing_run(capsys, tmp_path):
    _, err = fail(capsys, ["plot", str(tmp_path / "nothing")])
    assert "no such run directory" in err


# ----------------------------------------------------------------------------------------------------- running


def test_probe_builds_the_sft_trainer_and_reports(tmp_path, capsys):
    argv = [*TINY, "--output_dir", str(tmp_path), "--num_samples", "64", "--batch_size", "32"]
    assert cli.run_worker("probe", argv) == 0
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["num_samples"] == 64 and report["continuum_mean_p"] == "model-strong"  # the model knows its task
    # the placement reads the schedule's signal on its ramp, so it agrees with the lambda the warm start would give;
    # the embedded data carries wrong answers the model does not write, so it writes fewer rows exactly than its mean p
    from trl_prob.probe import place_on_continuum

    assert report["schedule_signal"] == "sequence_top1"
    assert report["continuum"] == place_on_continuum(report["schedule_signal_value"], report["schedule_ramp_low"],
                                                     report["schedule_ramp_high"]) != "model-weak"
    assert (tmp_path / "probe_histogram.png").is_file()
    assert not (tmp_path / "model.safetensors").exists()  # measured, not trained


def test_run_ends_without_trainer_end(monkeypatch, tmp_path, tiny_model, tokenizer, train_dataset):
    """transformers < 5.18 has no `Trainer.end`: the run still finishes its trackers and destroys the process group."""
    import transformers

    from conftest import base_args
    from trl_prob import ProbSFTConfig, ProbSFTTrainer

    args = ProbSFTConfig(**base_args(tmp_path, bf16=False))
    trainer = ProbSFTTrainer(model=tiny_model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    monkeypatch.delattr(transformers.Trainer, "end")
    ended = []
    monkeypatch.setattr(trainer.accelerator, "end_training", lambda: ended.append(True))
    cli.end(trainer)
    assert ended == [True]


# tqdm, with a total ("Loading weights:  50%|#####     | 1/2 [...]") or without one ("Generating train split: 200
# examples [00:00, ...]": datasets preparing a split it has not cached yet)
PROGRESS_BAR = re.compile(r"^(.*: *)?(\d+%\|.*\||\d+ [\w ]+ \[\d+:\d+)")


def stderr_lines(stderr: str) -> list[str]:
    """What a run wrote to stderr, one entry per line, progress bars (tqdm's carriage-return redraws) left out."""
    lines = [line.replace("\x1b[A", "").strip() for line in re.split(r"[\r\n]", stderr)]
    return [line for line in lines if line and not PROGRESS_BAR.match(line)]


@pytest.mark.real_model
def test_quickstart_end_to_end_through_the_console_script(tmp_path, capsys):
    """README step 1 on SmolLM2 (a few steps): what `auto` trains said before step 1, the summary printed and saved
    (24 held-out problems here), the adapter and the plot written, nothing else on stderr; a second run is refused."""
    from trl_prob.models import SmolLM2Unavailable, smollm2_dir

    try:
        smollm2_dir()
    except SmolLM2Unavailable as exc:
        pytest.skip(f"SmolLM2-135M-Instruct unavailable: {exc}")
    output_dir = tmp_path / "quickstart"
    # The recipe's data with its test split cut to 24 problems: the summary's greedy answers are most of the run's
    # time (the recipe's own split holds the 200 the README promises: checked here, not generated).
    mawps = os.path.join(ROOT, "examples", "data", "mawps")
    with open(os.path.join(mawps, "test.jsonl")) as f:
        test_rows = [line for line in f if line.strip()]
    assert len(test_rows) == 200
    data = tmp_path / "mawps"
    data.mkdir()
    shutil.copy(os.path.join(mawps, "train.jsonl"), data / "train.jsonl")
    (data / "test.jsonl").write_text("".join(test_rows[:24]))
    result = run(
        ["trl-prob", "sft", "--config", QUICKSTART, "--max_steps", "4", "--logging_steps", "2",
         "--schedule_warm_start_samples", "16", "--dataset_name", str(data), "--output_dir", str(output_dir)],  # fmt: skip
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Nothing on stderr but progress bars: no bitsandbytes kernel notices (nothing is loaded in 4 bits), no accelerate
    # "values were not passed to `accelerate launch`" block (one process), no other warning the project can avoid.
    assert stderr_lines(result.stderr) == []
    # the recipe's end-of-training summary, printed by the command itself
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["before"]["step"] == 0 and summary["after"]["step"] == 4 and summary["num_samples"] == 24
    from trl_prob.auto import AUTO_SETTINGS, describe
    from trl_prob.schedules import adaptive_lambda

    assert f"trl-prob: {describe()}" in result.stdout  # what `auto` trains, said before step 1
    scheduled = AUTO_SETTINGS.get("objective_schedule", "none") != "none"
    if scheduled:  # lambda of step 1 is the ramp read at the warm start's signal
        first = summary["lambda"]["first"]
        from trl_prob.schedules import DEFAULT_SIGNAL, SIGNALS

        assert first["value"] == pytest.approx(adaptive_lambda(first["ema_token_prob"], *SIGNALS[DEFAULT_SIGNAL].ramp))
    else:
        assert f"{AUTO_SETTINGS['objective']} throughout" in result.stdout  # a fixed objective, said in the summary
    for text in ("exact match", "mean target p", "lambda" if scheduled else "throughout", f"model        {output_dir}",
                 f"summary      {output_dir / 'summary.json'}", "checkpoints  none",
                 f"plot         {output_dir / 'training.png'}", "on the task (exact match on the"):  # fmt: skip
        assert text in result.stdout, result.stdout[-2000:]
    # the placement reads exact match on the default signal's ramp: a base that writes no answer is weak, whatever
    # its mean p (SmolLM2 here: mean p ~0.6, which the paper's proxy would call strong)
    before = summary["before"]
    low, high = __import__("trl_prob.schedules", fromlist=["SIGNALS"]).SIGNALS["sequence_top1"].ramp
    expected = "model-weak" if before["exact_match"] < low else "model-strong" if before["exact_match"] >= high else (
        "model-intermediate")
    assert before["continuum"] == expected and f"{expected} on the task" in result.stdout
    assert (output_dir / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert (output_dir / "adapter_model.safetensors").is_file()
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    lambdas = [entry["objective_lambda"] for entry in state["log_history"] if "objective_lambda" in entry]
    assert all(0.0 <= lam <= 1.0 for lam in lambdas)
    assert bool(lambdas) == scheduled

    # The same run again is refused, and leaves the run as it was.
    result = run(["trl-prob", "sft", "--config", QUICKSTART, "--output_dir", str(output_dir)], timeout=300)
    assert result.returncode == 1 and "already holds a run" in result.stderr
    assert json.loads((output_dir / "trainer_state.json").read_text()) == state

    assert cli.main(["plot", str(output_dir), "--output", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_probe_runs_with_no_device_flags(tmp_path):
    """The probe trains nothing: it runs wherever the model loads, with no --use_cpu / --bf16 (SFTConfig defaults bf16
    to True, which TrainingArguments refuses on a machine without a bf16 GPU)."""
    result = run(
        ["trl-prob", "probe", "--model_name_or_path", default_model_path(), "--dataset_name", default_dataset_path(),
         "--output_dir", str(tmp_path), "--num_samples", "32"],  # fmt: skip
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "probe.json").read_text())["num_samples"] == 32


def test_two_cpu_processes_agree_on_the_schedule(tmp_path):
    """DDP on two CPU processes (gloo) through `python -m trl_prob`: each rank logs the same lambda every step."""
    output_dir, rank_logs = tmp_path / "run", tmp_path / "ranks"
    result = run(
        [sys.executable, "-m", "trl_prob", "sft", "--experimental", *TINY, "--output_dir", str(output_dir),
         "--objective", "p", "--objective_schedule", "adaptive", "--schedule_signal", "mean",  # --experimental: --rank_log_dir, --summary_samples
         # a ramp around the tiny model's mean target probability, so lambda is strictly between 0 and 1 and moves
         "--schedule_ramp_low", "0.6", "--schedule_ramp_high", "0.95", "--schedule_ema_decay", "0.5",
         "--max_steps", "4", "--logging_steps", "1", "--save_strategy", "no", "--rank_log_dir", str(rank_logs),
         "--summary", "true", "--summary_samples", "41",
         "--multi_gpu", "--num_processes", "2", "--main_process_port", "29531"],  # fmt: skip
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output_dir / "model.safetensors").is_file()
    # the summary: printed once (main process), each of the 41 held-out samples counted once over the 2 ranks
    assert result.stdout.count("Summary (41 'test' samples") == 1, result.stdout[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["after"]["step"] == 4
    right = summary["after"]["exact_match"] * 41
    assert abs(right - round(right)) < 1e-9, summary  # a whole number of the 41 samples

    per_rank = {}
    for rank in (0, 1):
        lines = (rank_logs / f"rank{rank}.jsonl").read_text().splitlines()
        per_rank[rank] = [(e["step"], e["objective_lambda"], e["mean_token_prob"])
                          for e in map(json.loads, lines) if "objective_lambda" in e]  # fmt: skip
    assert [step for step, *_ in per_rank[0]] == [1, 2, 3, 4]
    assert per_rank[0] == per_rank[1]
    lambdas = [lam for _, lam, _ in per_rank[0]]
    assert all(0.0 < lam < 1.0 for lam in lambdas), lambdas
    assert len(set(lambdas)) > 1, lambdas
