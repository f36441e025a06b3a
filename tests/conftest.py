"""Shared fixtures: a tiny local Llama, its tokenizer and addition data. Everything offline, on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import sys  # noqa: E402

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

# The addition task's builders live in benchmarks/addition.py (not installed): the tests import them from there.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from addition import build_tokenizer, make_addition_examples, random_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def addition_dataset(n=64, noise=0.2, seed=0, format="prompt_completion") -> Dataset:
    rows = make_addition_examples(n, noise=noise, seed=seed, format=format)
    return Dataset.from_list([{k: v for k, v in row.items() if k not in ("answer", "noisy")} for row in rows])


@pytest.fixture
def train_dataset():
    return addition_dataset()


@pytest.fixture
def tiny_model():
    return random_tiny_llama(seed=0)


def base_args(tmp_path, **overrides):
    """ProbSFTConfig kwargs for fast, deterministic CPU runs."""
    args = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return args


def finish_rank(trainer, out: str, result) -> None:
    """End of a launched training script (tests/_*_train.py): the main process writes ``result()`` as JSON to ``out``;
    then every rank of a distributed launch meets the others and leaves the process group."""
    import json

    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if trainer.accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(result(), f)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
