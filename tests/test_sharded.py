"""Sharded training: FSDP2 over 2 CPU processes (gloo) trains the tiny model with the adaptive schedule and logs the
losses, mean p and lambda of the 1-process run, step for step, within fp32 tolerance; DeepSpeed ZeRO-3 where DeepSpeed
can run; FSDP asked for on a CPU run, which accelerate does not shard, is one warning line.

Every multi-process run is a subprocess under a timeout. See tests/_cpu_fsdp.py for why FSDP2 on CPU needs a shim.
"""

from __future__ import annotations

import importlib.util
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import addition_dataset, base_args  # noqa: E402
from _launch import accelerate_launch, torchrun  # noqa: E402
from _launch import ddp_train as launch  # noqa: E402  (the 1-process run of tests/_ddp_train.py)

from trl_prob import ProbSFTConfig, ProbSFTTrainer  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
KEYS = ["loss", "mean_token_prob", "nll", "grad_norm", "objective_lambda", "schedule_signal_ema"]


def run_fsdp2(out, per_device_batch: int, timeout: int = 480) -> dict:
    import json

    torchrun("--nproc_per_node", 2, os.path.join(TESTS, "_cpu_fsdp.py"), os.path.join(TESTS, "_ddp_train.py"), out, "p",
             "adaptive", per_device_batch, 3, timeout=timeout, check=True)  # fmt: skip
    with open(out) as f:
        return json.load(f)


def test_fsdp2_two_cpu_processes_match_one_process(tmp_path):
    one = launch(tmp_path / "one.json", "p", "adaptive", 4, num_processes=1)
    two = run_fsdp2(tmp_path / "two.json", 2)
    # really sharded: accelerate's FSDP2 wrapper, parameters as DTensors over the 2 ranks
    assert two["fsdp"] == {"enabled": True, "wrapped": "FSDPLlamaForCausalLM", "sharded": True}
    assert two["world_size"] == 2 and not one["fsdp"]["enabled"]
    assert two["first_batch_ids"] == one["first_batch_ids"]  # the same global batch, split over the ranks

    lambdas = [entry["objective_lambda"] for entry in one["logs"]]
    assert all(0.0 < lam < 1.0 for lam in lambdas), lambdas  # the schedule is live, not pinned at an end
    assert len(one["logs"]) == len(two["logs"]) == 3
    for a, b in zip(one["logs"], two["logs"]):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
    # the full weights, gathered from the shards, after 3 optimizer steps
    torch.testing.assert_close(torch.tensor(two["weights"]), torch.tensor(one["weights"]), rtol=1e-4, atol=1e-5)
    for key in ("eval_mean_token_prob", "eval_nll"):
        assert two["evaluation"][key] == pytest.approx(one["evaluation"][key], rel=1e-5), key


def run_zero3(out, per_device_batch: int, timeout: int = 480) -> dict:
    import json

    # verified with use_cpu off: DeepSpeed picks its CPU accelerator (gloo) itself
    accelerate_launch("--config_file", os.path.join(ROOT, "recipes", "accelerate", "zero3.yaml"), "--num_processes", 2,
                      "--mixed_precision", "no", "--main_process_port", 0, os.path.join(TESTS, "_ddp_train.py"), out,
                      "p", "adaptive", per_device_batch, 3, timeout=timeout, env={"TRL_PROB_TEST_USE_CPU": "0"},
                      check=True)  # fmt: skip
    with open(out) as f:
        return json.load(f)


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or torch.cuda.is_available(),
    reason="needs deepspeed (pip install deepspeed; 0.19.8 verified: it installs from PyPI without compiling and runs "
    "ZeRO-3 on CPU over gloo) and a machine without CUDA (on a GPU machine the run would go to the GPU)",
)
def test_zero3_two_cpu_processes_match_one_process(tmp_path):
    """recipes/accelerate/zero3.yaml (ZeRO-3, no offload) over 2 CPU processes, against the 1-process run."""
    one = launch(tmp_path / "one.json", "p", "adaptive", 4, num_processes=1)
    two = run_zero3(tmp_path / "two.json", 2)
    assert two["deepspeed"] == {"enabled": True, "wrapped": "DeepSpeedEngine", "zero3": True}
    assert two["world_size"] == 2 and two["first_batch_ids"] == one["first_batch_ids"]
    for a, b in zip(one["logs"], two["logs"], strict=True):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
    torch.testing.assert_close(torch.tensor(two["weights"]), torch.tensor(one["weights"]), rtol=1e-4, atol=1e-5)


def test_fsdp_asked_for_on_cpu_is_one_warning_line(tmp_path, tokenizer, tiny_model, monkeypatch, caplog):
    """`--accelerate_config fsdp2.yaml` on a CPU run: accelerate trains data parallel instead, and says nothing;
    trl-prob says it in one line."""
    variable = "ACCELERATE_USE_FSDP"
    monkeypatch.setenv(variable, "true")
    with caplog.at_level(logging.WARNING, logger="trl_prob"):
        trainer = ProbSFTTrainer(model=tiny_model, args=ProbSFTConfig(**base_args(tmp_path)), processing_class=tokenizer,
                                 train_dataset=addition_dataset(8))  # fmt: skip
    assert not trainer.is_fsdp_enabled
    said = [r.getMessage() for r in caplog.records if variable in r.getMessage()]
    assert len(said) == 1 and "not sharded" in said[0], said
