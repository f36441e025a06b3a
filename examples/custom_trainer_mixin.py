"""Bring the objective to your own trainer: put ``ProbObjectiveMixin`` first in the bases of any ``SFTTrainer``
subclass and pass a ``ProbSFTConfig``. Your overrides keep working; the mixin only swaps the per-token loss inside
TRL's fused log-prob head and runs the schedule at each optimizer step.

    python examples/custom_trainer_mixin.py --max_steps 5
"""

import argparse

from datasets import load_dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTTrainer

from trl_prob import ProbObjectiveMixin, ProbSFTConfig
from trl_prob.embedded import default_dataset_path, default_model_path


class MySFTTrainer(SFTTrainer):
    """A stand-in for your own trainer: here it only counts the batches it sees."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_seen = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches_seen += 1
        return super().training_step(model, inputs, num_items_in_batch)


class MyProbSFTTrainer(ProbObjectiveMixin, MySFTTrainer):
    """Your trainer, training the probability-based objective on its schedule."""


class PrintLambda(TrainerCallback):
    """The schedule's lambda (and the statistic it follows) as the trainer logs them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "objective_lambda" in logs and state.is_world_process_zero:
            print(f"step {state.global_step}: lambda {logs['objective_lambda']:.2f}, "
                  f"schedule signal (moving avg.) {logs['schedule_signal_ema']:.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--output_dir", default="runs/custom-trainer")
    args = parser.parse_args(argv)

    config = ProbSFTConfig(
        output_dir=args.output_dir,
        objective="power:2",               # -p^2: between 1 - p and the paper's sharper -p^10
        objective_schedule="linear",       # lambda 0 -> 1 over the first half of training, whatever the model knows
        schedule_warmup_ratio=0.5,
        learning_rate=1e-3,
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        logging_steps=max(1, args.max_steps // 6),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = MyProbSFTTrainer(
        model=default_model_path(),        # a path or Hub id works as in SFTTrainer
        args=config,
        train_dataset=load_dataset(default_dataset_path(), split="train"),
        processing_class=AutoTokenizer.from_pretrained(default_model_path()),
        callbacks=[PrintLambda()],
    )
    trainer.train()
    print(f"{trainer.batches_seen} batches through MySFTTrainer.training_step; final lambda "
          f"{trainer.objective_lambda:.2f}")


if __name__ == "__main__":
    main()
