"""Regenerate the shipped model and data: ``python -m trl_prob.embedded build [--out DIR]``.

Writes ``DIR/model`` (tiny Llama + tokenizer + ``build_info.json``) and ``DIR/data`` (``train.jsonl``,
``test.jsonl``). ``DIR`` defaults to the package directory, i.e. it overwrites the shipped artifacts. The build is
deterministic for a given machine / torch version and takes a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import (
    _HERE,
    build_tokenizer,
    exact_match_accuracy,
    make_addition_examples,
    mean_target_probability,
    pretrain_on_task,
    random_tiny_llama,
)

# Disjoint seeds for every data stream; the pretraining data never shares a seed with the shipped train set.
TEST_SEED, TRAIN_SEED, VAL_SEED, PRETRAIN_DATA_SEED, MODEL_SEED, PRETRAIN_SEED = 101, 202, 303, 404, 0, 0
N_TRAIN, N_TEST, N_VAL, N_PRETRAIN, NOISE, DIGITS = 2000, 200, 300, 6000, 0.2, 2
# Stop pretraining once clean validation accuracy reaches this: high enough for the "strong end" of the capability
# continuum, low enough that the model is not saturated (its mean target probability on the noisy train set lands
# around 0.75, leaving room for the objectives under study to differ).
TARGET_VAL_ACCURACY = 0.7
MAX_STEPS, CHECK_EVERY, LR, BATCH_SIZE = 5000, 50, 3e-3, 128


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(out: str) -> dict:
    """Build the shipped data and model into ``out``; returns the measured metrics."""
    start = time.time()
    tokenizer = build_tokenizer()

    test = make_addition_examples(N_TEST, seed=TEST_SEED, digits=DIGITS)
    held_out = [ex["prompt"] for ex in test]
    train = make_addition_examples(N_TRAIN, noise=NOISE, seed=TRAIN_SEED, digits=DIGITS, exclude=held_out)
    val = make_addition_examples(N_VAL, seed=VAL_SEED, digits=DIGITS, exclude=held_out)
    held_out += [ex["prompt"] for ex in val]
    # Pretrain on the same clean pairs in both the plain and the chat format, so the model knows the task whichever
    # way a benchmark presents it (prompt-completion, conversational or assistant-only messages).
    pretrain_data = [
        ex
        for fmt in ("prompt_completion", "conversational")
        for ex in make_addition_examples(
            N_PRETRAIN, seed=PRETRAIN_DATA_SEED, digits=DIGITS, format=fmt, exclude=held_out
        )
    ]

    model = random_tiny_llama(seed=MODEL_SEED)
    steps_done = 0

    def reached(m) -> bool:
        nonlocal steps_done
        steps_done += CHECK_EVERY
        acc = exact_match_accuracy(m, tokenizer, val)
        print(f"  step {steps_done:5d}  val exact match {acc:.3f}", flush=True)
        return acc >= TARGET_VAL_ACCURACY

    print(f"pretraining on {len(pretrain_data)} clean examples ...", flush=True)
    pretrain_on_task(
        model, tokenizer, pretrain_data, steps=MAX_STEPS, lr=LR, batch_size=BATCH_SIZE, seed=PRETRAIN_SEED,
        until=reached, check_every=CHECK_EVERY,
    )
    test_messages = make_addition_examples(N_TEST, seed=TEST_SEED, digits=DIGITS, format="messages")
    metrics = {
        "pretrain_steps": steps_done,
        "val_exact_match": exact_match_accuracy(model, tokenizer, val),
        "test_exact_match": exact_match_accuracy(model, tokenizer, test),
        "test_exact_match_chat": exact_match_accuracy(model, tokenizer, test_messages),
        "train_mean_target_probability": mean_target_probability(model, tokenizer, train),
        "test_mean_target_probability": mean_target_probability(model, tokenizer, test),
    }

    model_dir, data_dir = os.path.join(out, "model"), os.path.join(out, "data")
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(data_dir, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    info = {
        "task": f"{DIGITS}-digit addition, prompt 'a+b=', completion 'a+b' (EOS appended by TRL)",
        "seeds": {"test": TEST_SEED, "train": TRAIN_SEED, "val": VAL_SEED, "pretrain_data": PRETRAIN_DATA_SEED,
                  "model": MODEL_SEED, "pretrain": PRETRAIN_SEED},
        "train": {"n": N_TRAIN, "noise": NOISE},
        "test": {"n": N_TEST, "noise": 0.0},
        "pretraining": {"n_clean_pairs": N_PRETRAIN, "formats": ["prompt_completion", "conversational"], "lr": LR,
                        "batch_size": BATCH_SIZE, "target_val_exact_match": TARGET_VAL_ACCURACY},
        "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
        "torch": torch.__version__,
    }
    with open(os.path.join(model_dir, "build_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    _write_jsonl(os.path.join(data_dir, "train.jsonl"), train)
    _write_jsonl(os.path.join(data_dir, "test.jsonl"), test)
    metrics["build_seconds"] = time.time() - start
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trl_prob.embedded", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="regenerate the shipped model and data")
    build_parser.add_argument("--out", default=_HERE, help="output directory (default: the package directory)")
    args = parser.parse_args(argv)
    if args.command == "build":
        metrics = build(args.out)
        for key, value in metrics.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        if metrics["val_exact_match"] < TARGET_VAL_ACCURACY:
            print(f"warning: pretraining stopped at MAX_STEPS={MAX_STEPS} below the target accuracy", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
