"""Shared fixtures: a tiny local Llama, its tokenizer and addition data. Everything offline, on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

# The addition task's builders live in benchmarks/addition.py (not installed): pyproject.toml's pytest `pythonpath` puts
# benchmarks/ on sys.path for the tests, tests/_launch.py's PYTHONPATH for the processes they start.
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


def make_trainer(tmp_path, tokenizer, model, rows: int = 16, **overrides):
    """A ``ProbSFTTrainer`` on ``rows`` addition rows with :func:`base_args` (float32: ``bf16=False``) and
    ``overrides``."""
    from trl_prob import ProbSFTConfig, ProbSFTTrainer

    args = ProbSFTConfig(**base_args(tmp_path, **{"bf16": False, **overrides}))
    return ProbSFTTrainer(model=model, args=args, train_dataset=addition_dataset(rows), processing_class=tokenizer)


def first_batch(trainer) -> dict:
    """The trainer's first training batch, collated and on its device, as ``compute_loss`` gets it."""
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def grads(model) -> dict:
    """Each parameter's gradient (a copy), by name; parameters without one left out."""
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


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


def logits_loss_trainer_class():
    """A ``ProbSFTTrainer`` subclass whose compute_loss calls the model the ordinary way (full logits, the model's own
    NLL): what a user's subclass that bypasses TRL's fused head looks like."""
    from trl_prob import ProbSFTTrainer

    class LogitsLossTrainer(ProbSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._in_compute_loss = True  # as the mixin's compute_loss does around TRL's
            try:
                outputs = model(**inputs)
            finally:
                self._in_compute_loss = False
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return LogitsLossTrainer
