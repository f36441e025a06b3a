"""Train with the probability-based objective from Python: ``ProbSFTTrainer`` is TRL's ``SFTTrainer`` with
``ProbSFTConfig`` in place of ``SFTConfig``. Runs offline on a CPU, on the embedded default (a tiny model that already
knows 2-digit addition, and noisy addition data).

    python examples/train_python_api.py                 # 2 epochs, ~1 minute on a laptop CPU
    python examples/train_python_api.py --max_steps 5   # a smoke run
"""

import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_prob import ProbSFTConfig, ProbSFTTrainer
from trl_prob.embedded import default_dataset_path, default_model_path


def exact_match(model, tokenizer, rows) -> float:
    """Share of prompts whose greedy completion is the clean answer followed by EOS."""
    batch = tokenizer(list(rows["prompt"]), padding=True, padding_side="left", return_tensors="pt").to(model.device)
    out = model.generate(**batch, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :])
    return sum(c.split(tokenizer.eos_token)[0] == a for c, a in zip(completions, rows["answer"])) / len(completions)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_steps", type=int, default=-1, help="Stop after this many steps (-1: two epochs).")
    parser.add_argument("--output_dir", default="runs/python-api")
    args = parser.parse_args(argv)

    dataset = load_dataset(default_dataset_path())  # train (20% wrong answers) and test (clean)
    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())

    config = ProbSFTConfig(
        output_dir=args.output_dir,
        # The objective and its schedule: start from NLL, move to 1 - p as the share of target tokens the model ranks
        # first (measured on the data before step 1, then tracked every step) rises from 0.30 to 0.55.
        objective="p",
        objective_schedule="adaptive",
        # Everything else is plain SFTConfig.
        learning_rate=1e-3,
        num_train_epochs=2,
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = ProbSFTTrainer(model=model, args=config, train_dataset=dataset["train"], processing_class=tokenizer)

    before = exact_match(model, tokenizer, dataset["test"])
    trainer.train()
    after = exact_match(trainer.model, tokenizer, dataset["test"])
    print(f"exact match on the clean test split: {before:.3f} -> {after:.3f}")
    print(f"final objective_lambda: {trainer.objective_lambda:.2f}")
    trainer.save_model()


if __name__ == "__main__":
    main()
