"""Faults a real run meets: the process killed with SIGKILL (kill -9) in the middle of a training step, while a
checkpoint is being written, right after one was written, and at a random moment; then `--resume_from_checkpoint
true`. The resumed run must end with the log history of an uninterrupted run, step for step, and never resume from a
half-written checkpoint.

Every run is a subprocess (tests/_fault_train.py: the per-process entry `trl_prob.cli sft`, with the fault injected by
the harness) under a timeout, so a hung run fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import _launch  # noqa: E402
from trl_prob.embedded import default_dataset_path, default_model_path  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "_fault_train.py")
STEPS, SAVE_STEPS, TIMEOUT = 12, 2, 240
FLAGS = [
    "--model_name_or_path", default_model_path(), "--dataset_name", default_dataset_path(),
    "--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none",
    "--disable_tqdm", "true", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
    "--max_steps", str(STEPS), "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS),
    "--seed", "0", "--data_seed", "0",
    # a ramp around the shipped model's statistic, so lambda moves strictly inside (0, 1) and the trajectory depends
    # on the restored schedule state
    "--objective", "p", "--objective_schedule", "adaptive", "--schedule_signal", "token_top1", "--schedule_ramp_low", "0.55", "--schedule_ramp_high", "0.85",
    "--schedule_ema_decay", "0.5", "--schedule_warm_start_samples", "16",
]  # fmt: skip
# per-step entries; wall-clock fields left out
VOLATILE = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}


def run(fault: str, output_dir, *flags: str, kill_after: float | None = None) -> subprocess.CompletedProcess:
    """One process of `trl-prob sft` with ``fault``; with ``kill_after``, the test kills it (SIGKILL) that many seconds
    after its first logged step."""
    command = [sys.executable, HARNESS, fault, "sft", *FLAGS, "--output_dir", str(output_dir), *flags]
    if kill_after is None:
        return _launch.run(command, TIMEOUT, cwd=None)
    process = _launch.start(command, cwd=None)
    deadline = time.monotonic() + TIMEOUT
    try:
        for line in process.stdout:  # progress is off: stdout carries the logged dicts
            if line.startswith("{'loss'"):
                time.sleep(kill_after)
                process.send_signal(signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                break
        out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"random kill: no exit within {TIMEOUT}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def history(output_dir) -> dict[int, dict]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        log_history = json.load(f)["log_history"]
    return {e["step"]: {k: v for k, v in e.items() if k not in VOLATILE} for e in log_history if "loss" in e}


def resume(output_dir, fault: str = "none", **kwargs) -> subprocess.CompletedProcess:
    return run(fault, output_dir, "--resume_from_checkpoint", "true", **kwargs)


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run("none", output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = history(output_dir)
    assert sorted(logged) == list(range(1, STEPS + 1))
    lambdas = [entry["objective_lambda"] for entry in logged.values()]
    assert all(0.0 < lam < 1.0 for lam in lambdas) and max(lambdas) - min(lambdas) > 1e-3, lambdas
    return logged


def test_killed_anywhere_then_resumed_ends_like_an_uninterrupted_run(tmp_path, uninterrupted):
    """One run killed six times, each kill at a different kind of moment, each time resumed with
    `--resume_from_checkpoint true`; checkpoints every 2 steps."""
    output_dir = tmp_path / "run"

    def complete(step: int) -> bool:  # a one-process checkpoint: its trainer_state.json, written last, is whole
        try:
            return isinstance(json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text()), dict)
        except (OSError, ValueError):
            return False

    # 1. mid-step 3 (after backward, before the optimizer step): checkpoint-2 is the last one
    assert killed(run("step:3", output_dir))
    assert complete(2) and not (output_dir / "checkpoint-4").exists()

    # 2. while writing checkpoint-4's optimizer state: checkpoint-4 exists, half-written, and must be skipped
    result = resume(output_dir, "write:optimizer.pt@4")
    assert killed(result), result.stderr[-3000:]
    assert (output_dir / "checkpoint-4" / "model.safetensors").is_file() and not complete(4)

    # 3. resumes from checkpoint-2 (saying it skips checkpoint-4), killed while writing checkpoint-4's weights
    result = resume(output_dir, "write:model.safetensors@4")
    assert killed(result), result.stderr[-3000:]
    assert "resuming from" in result.stderr and "checkpoint-4" in result.stderr
    assert not complete(4)

    # 4. killed while writing checkpoint-6's trainer state (the last file transformers writes): half a JSON file
    result = resume(output_dir, "write:trainer_state.json@6")
    assert killed(result), result.stderr[-3000:]
    assert complete(4) and not complete(6)

    # 5. killed right after checkpoint-8's trainer state was written: checkpoint-8 is complete (one process)
    result = resume(output_dir, "saved:8")
    assert killed(result), result.stderr[-3000:]
    assert complete(8)

    # 6. killed at a random moment after the run's first logged step (it may also finish first)
    delay = random.Random(15).uniform(0.0, 0.4)
    result = resume(output_dir, kill_after=delay)
    assert killed(result) or result.returncode == 0, result.stderr[-3000:]

    # resumed to the end (unless the kill came after the last checkpoint, which then holds the finished run: resuming
    # it is refused in one line, as transformers would train one step past the end)
    if killed(result):
        result = resume(output_dir)
        finished = result.returncode == 1 and "the run finished" in result.stderr
        assert result.returncode == 0 or finished, result.stderr[-3000:]
    # the same log history, step for step, as the run nobody killed (num_tokens included: TRL's counter is carried
    # across each resume)
    assert history(output_dir / f"checkpoint-{STEPS}") == uninterrupted
    if result.returncode == 0:
        assert history(output_dir) == uninterrupted
        result = resume(output_dir)
        assert result.returncode == 1 and "the run finished" in result.stderr, result.stderr[-3000:]


def test_no_complete_checkpoint_is_one_line_and_touches_nothing(tmp_path):
    """Killed while writing the only checkpoint: `--resume_from_checkpoint true` refuses with one line naming it."""
    output_dir = tmp_path / "run"
    assert killed(run("write:trainer_state.json@2", output_dir))
    before = sorted(p.name for p in (output_dir / "checkpoint-2").iterdir())
    result = resume(output_dir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "no complete checkpoint" in lines[0] and "checkpoint-2" in lines[0] and "cut short" in lines[0]
    assert sorted(p.name for p in (output_dir / "checkpoint-2").iterdir()) == before
