"""Speed where a CPU user waits: the precision a CPU run picks (and says), the cores it uses, the warm start's progress.

TRL turns bf16 on by default; on a CPU without native bf16 (AVX512-BF16 or AMX) autocast is emulated and a step is
about 10x slower. The CPU's capability is patched here, so every branch runs on whatever CPU runs the suite.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from conftest import addition_dataset, base_args
from trl_prob import ProbSFTConfig, ProbSFTTrainer, cli
from trl_prob import config as config_module
from trl_prob.embedded import default_dataset_path, default_model_path


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU's bf16 capability and whether an accelerator is there: ``cpu(native_bf16=..., accelerator=...)``."""

    def set_cpu(native_bf16: bool, accelerator: bool = False):
        monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: native_bf16)
        monkeypatch.setattr(config_module, "has_accelerator", lambda: accelerator)

    return set_cpu


def args_without_bf16(tmp_path, **overrides):
    args = base_args(tmp_path, **overrides)
    args.pop("bf16", None)
    return args


def trainer_logs(tmp_path, tiny_model, tokenizer, caplog, **config):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trl_prob"):
        args = ProbSFTConfig(**config)
        trainer = ProbSFTTrainer(model=tiny_model, args=args, train_dataset=addition_dataset(16),
                                 processing_class=tokenizer)  # fmt: skip
    said = [r for r in caplog.records if r.getMessage().startswith("trl-prob: CPU run")]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    return trainer, said[0]


def test_cpu_without_native_bf16_trains_in_float32_and_says_why(tmp_path, tiny_model, tokenizer, caplog, cpu):
    cpu(native_bf16=False)
    trainer, said = trainer_logs(tmp_path, tiny_model, tokenizer, caplog, **args_without_bf16(tmp_path))
    assert trainer.args.bf16 is False
    assert trainer.accelerator.mixed_precision == "no"
    assert said.levelno == logging.WARNING
    assert "float32" in said.getMessage() and "no native bf16" in said.getMessage() and "--bf16 true" in said.getMessage()
    trainer.train()  # and it trains


def test_explicit_bf16_is_kept_on_an_emulating_cpu_with_a_warning(tmp_path, tiny_model, tokenizer, caplog, cpu):
    cpu(native_bf16=False)
    trainer, said = trainer_logs(tmp_path, tiny_model, tokenizer, caplog, **base_args(tmp_path, bf16=True))
    assert trainer.args.bf16 is True and trainer.accelerator.mixed_precision == "bf16"
    assert said.levelno == logging.WARNING and "emulates" in said.getMessage()


def test_native_bf16_cpu_keeps_trls_bf16_default(tmp_path, tiny_model, tokenizer, caplog, cpu):
    cpu(native_bf16=True)
    trainer, said = trainer_logs(tmp_path, tiny_model, tokenizer, caplog, **args_without_bf16(tmp_path))
    assert trainer.args.bf16 is True and trainer.accelerator.mixed_precision == "bf16"
    assert said.levelno == logging.INFO and "natively" in said.getMessage()


@pytest.mark.parametrize("native", [False, True])
def test_a_machine_without_accelerator_needs_no_use_cpu(tmp_path, cpu, native):
    """Without --use_cpu and without a GPU, transformers refuses TRL's bf16 default ("Your setup doesn't support
    bf16/gpu"); trl-prob picks the CPU precision instead."""
    cpu(native_bf16=native)
    args = ProbSFTConfig(**args_without_bf16(tmp_path, use_cpu=False))
    assert args.bf16 is native
    assert args.device.type == "cpu"


def test_no_choice_is_made_where_an_accelerator_runs_the_job(cpu):
    cpu(native_bf16=False, accelerator=True)
    on_gpu = SimpleNamespace(use_cpu=False, fp16=False, bf16=None)
    assert ProbSFTConfig._choose_cpu_precision(on_gpu) is None and on_gpu.bf16 is None  # TRL's default decides


def test_the_flag_is_explicit_through_the_command_line_parser(tmp_path, cpu):
    """`--bf16` on the command line (or in YAML) is the user's word; its absence lets trl-prob choose."""
    cpu(native_bf16=False)
    common = ["--model_name_or_path", default_model_path(), "--dataset_name", default_dataset_path(),
              "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
    chosen = cli.make_parser("sft").parse_args_and_config(common)[1]
    asked = cli.make_parser("sft").parse_args_and_config(common + ["--bf16", "true"])[1]
    assert chosen.bf16 is False and asked.bf16 is True


# ------------------------------------------------------------------------------------------------ cores


def launched_threads(argv) -> int:
    """What `accelerate launch` would set OMP_NUM_THREADS to for the run ``argv`` (launched by a fake)."""
    from accelerate.commands.launch import _validate_launch_command
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    recorded = []
    assert cli.launch("sft", argv, launch_command_fn=recorded.append) == 0
    namespace = _validate_launch_command(recorded[0])[0]
    return int(prepare_simple_launcher_cmd_env(namespace)[1]["OMP_NUM_THREADS"])


TINY_RUN = ["--model_name_or_path", default_model_path(), "--dataset_name", default_dataset_path(),
            "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]  # fmt: skip


def test_single_process_cpu_run_uses_the_machines_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launched_threads(TINY_RUN + ["--output_dir", str(tmp_path / "a")]) == torch.get_num_threads()
    # Two processes share the cores; an explicit setting wins.
    two = launched_threads(TINY_RUN + ["--output_dir", str(tmp_path / "b"), "--num_processes", "2"])
    assert two == max(1, torch.get_num_threads() // 2)
    explicit = TINY_RUN + ["--output_dir", str(tmp_path / "c"), "--num_cpu_threads_per_process", "1"]
    assert launched_threads(explicit) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launched_threads(TINY_RUN + ["--output_dir", str(tmp_path / "d")]) == 1


# ------------------------------------------------------------------------------------------------ warm start


def test_warm_start_shows_progress(tmp_path, tiny_model, tokenizer, capsys):
    args = ProbSFTConfig(**base_args(tmp_path, objective="p", objective_schedule="adaptive", max_steps=1,
                                     schedule_warm_start_samples=16, disable_tqdm=False, bf16=False))  # fmt: skip
    trainer = ProbSFTTrainer(model=tiny_model, args=args, train_dataset=addition_dataset(32), processing_class=tokenizer)
    trainer.train()
    assert "measuring p" in capsys.readouterr().err
    assert trainer.schedule.warm_started
