"""Short ProbSFTTrainer run for tests/test_training.py: one process, or one rank of a CPU (gloo) DDP launch.

Usage: python tests/_ddp_train.py OUT.json OBJECTIVE SCHEDULE PER_DEVICE_BATCH [MAX_STEPS [STATISTIC]]

STATISTIC ``per_source``: the mean signal, one schedule per source, on two sources (addition, and addition with the
answers reversed, which the shipped model has not learnt).

Rank 0 writes JSON: the per-step log history, the final and initial weights flattened (gathered from the shards under
FSDP2 / ZeRO-3), the world size, whether and how the model was sharded, the token ids of the first global batch (every
rank's first micro-batch, gathered), and an evaluation's metrics. TRL_PROB_TEST_USE_CPU=0 leaves use_cpu off.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

# tests/ and benchmarks/ are on PYTHONPATH (tests/_launch.py starts this script)
from conftest import addition_dataset, base_args, finish_rank  # noqa: E402
from addition import build_tokenizer  # noqa: E402

from trl_prob.experimental import ExperimentalSFTConfig  # noqa: E402  (the research knobs these tests use)
from trl_prob import ProbSFTConfig, ProbSFTTrainer  # noqa: E402
from trl_prob.embedded import default_model_path  # noqa: E402


class FirstBatchTrainer(ProbSFTTrainer):
    first_batch = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.first_batch is None and model.training:
            ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
            self.first_batch = [row[m].tolist() for row, m in zip(ids, mask)]
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def flat(model):
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


def two_sources(dataset):
    """Every other row becomes source ``rev``, its answer written backwards."""

    def tag(row, index):
        if index % 2:
            return {"completion": row["completion"][::-1], "source": "rev"}
        return {"completion": row["completion"], "source": "add"}

    return dataset.map(tag, with_indices=True)


def main():
    out, objective, schedule, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    max_steps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    statistic = sys.argv[6] if len(sys.argv) > 6 else "mean"
    torch.set_num_threads(1)
    per_source = statistic == "per_source"
    statistic = "mean" if per_source else statistic
    extra = dict(schedule_ramp_low=0.2, schedule_ramp_high=0.95, schedule_signal=statistic) if schedule == "adaptive" else {}
    if schedule == "token_gate":  # each token's lambda from its own sum_v p_v^2, on a ramp that splits the tokens
        extra = dict(schedule_ramp_low=0.2, schedule_ramp_high=0.95)
    if per_source:
        extra["schedule_per_source"] = True
    with tempfile.TemporaryDirectory() as tmp:
        args = ExperimentalSFTConfig(
            **base_args(
                pathlib.Path(tmp),
                objective=objective,
                objective_schedule=schedule,
                per_device_train_batch_size=batch,
                per_device_eval_batch_size=batch,
                max_steps=max_steps,
                ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
                bf16=False,  # SFTConfig's default bf16 autocast would blur the 1-vs-2-process comparison
                # the ZeRO-3 test runs with use_cpu off (verified that way; DeepSpeed picks its CPU accelerator itself)
                use_cpu=os.environ.get("TRL_PROB_TEST_USE_CPU", "1") == "1",
                **extra,
            )
        )
        model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
        initial = flat(model)
        train, evaluation = addition_dataset(32), addition_dataset(7, seed=11)
        if per_source:
            train, evaluation = two_sources(train), two_sources(evaluation)
        trainer = FirstBatchTrainer(model=model, args=args, train_dataset=train, processing_class=build_tokenizer())
        trainer.train()
        # 7 samples over 2 processes x 2: accelerate repeats one to even the last batch; it must count once.
        evaluation = trainer.evaluate(eval_dataset=evaluation)

        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        batches = [trainer.first_batch]
        if distributed:
            batches = [None] * world_size
            dist.all_gather_object(batches, trainer.first_batch)
        # the full weights on rank 0, whatever holds them (FSDP2 shards them into DTensors)
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)

        def result():
            names = [name for name, _ in trainer.accelerator.unwrap_model(trainer.model).named_parameters()]
            weights = torch.cat([state[name].detach().float().flatten().cpu() for name in names])
            wrapped = trainer.model_wrapped
            return dict(
                fsdp=dict(enabled=trainer.is_fsdp_enabled, wrapped=type(wrapped).__name__,
                          sharded=any(type(p).__name__ == "DTensor" for p in wrapped.parameters())),  # fmt: skip
                deepspeed=dict(enabled=trainer.is_deepspeed_enabled, wrapped=type(wrapped).__name__,
                               zero3=any(hasattr(p, "ds_id") for p in wrapped.parameters())),  # fmt: skip
                world_size=world_size,
                max_steps=max_steps,
                evaluation=evaluation,
                logs=[entry for entry in trainer.state.log_history if "loss" in entry],
                first_batch_ids=[ids for rank_batch in batches for ids in rank_batch],
                weights=weights.tolist(),
                initial_weights=initial.tolist(),
            )

        finish_rank(trainer, out, result)


if __name__ == "__main__":
    main()
