"""Short ASFT run with LoRA for tests/test_asft.py: one process, or one rank of a CPU (gloo) DDP launch.

Usage: python tests/_asft_train.py OUT.json OBJECTIVE PER_DEVICE_BATCH MAX_STEPS [GRAD_ACCUM]

The shipped tiny model with LoRA adapters initialised away from zero (``init_lora_weights=False``, seeded), so the KL
to the base (the same model, adapters disabled) is not 0 from the first step. Rank 0 writes JSON: the per-step logs,
the LoRA weights after training, an evaluation's metrics, the world size and whether the adapters ended enabled.
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

from trl_prob import ProbSFTConfig, ProbSFTTrainer  # noqa: E402
from trl_prob.embedded import default_model_path  # noqa: E402

LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def perturbed_lora(model, seed: int = 0):
    """``model`` with LoRA adapters whose B is random (PEFT's ``init_lora_weights=False``), from a fixed seed."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
                             init_lora_weights=False)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def adapters_enabled(peft_model) -> bool:
    """Whether the PEFT model's adapters are enabled and trainable (the ASFT reference pass must leave them so)."""
    status = peft_model.get_model_status()
    return status.enabled is True and all(status.requires_grad.values())


def main():
    out, objective, batch, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    accumulation = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    torch.set_num_threads(1)
    distributed_launch = int(os.environ.get("WORLD_SIZE", "1")) > 1
    with tempfile.TemporaryDirectory() as tmp:
        args = ProbSFTConfig(
            **base_args(
                pathlib.Path(tmp), objective=objective, per_device_train_batch_size=batch,
                per_device_eval_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=max_steps,
                learning_rate=1e-2, ddp_backend="gloo" if distributed_launch else None, bf16=False,
            )
        )  # fmt: skip
        model = perturbed_lora(AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32))
        trainer = ProbSFTTrainer(model=model, args=args, train_dataset=addition_dataset(32),
                                 processing_class=build_tokenizer())  # fmt: skip
        trainer.train()
        evaluation = trainer.evaluate(eval_dataset=addition_dataset(8, seed=11))
        distributed = dist.is_available() and dist.is_initialized()

        def result():
            peft_model = trainer.accelerator.unwrap_model(trainer.model)
            lora = torch.cat([p.detach().float().flatten() for n, p in peft_model.named_parameters() if "lora_" in n])
            return dict(
                world_size=dist.get_world_size() if distributed else 1,
                logs=[entry for entry in trainer.state.log_history if "loss" in entry],
                evaluation=evaluation,
                lora=lora.tolist(),
                adapters_enabled=adapters_enabled(peft_model),
                reference_passes=trainer.asft_reference.reference_passes,
            )

        finish_rank(trainer, out, result)


if __name__ == "__main__":
    main()
