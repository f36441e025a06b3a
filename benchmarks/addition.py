"""The addition task behind the embedded default: its builders, scorers and rebuild command (not installed).

The installed package ships only the result (``trl_prob.embedded``: a tiny Llama that already knows 2-digit addition,
and its data). This module makes them, and is what the benchmarks and the tests share:

- :func:`build_tokenizer`, :func:`tiny_llama_config`, :func:`random_tiny_llama`: a character-level tokenizer with a
  chat template, and a tiny Llama sized for it (everything local, no model hub);
- :func:`make_addition_examples`: addition data (``"37+45="`` -> ``"82"``) in TRL's three formats, with optional label
  noise; every example carries its clean ``"answer"`` and whether it is ``"noisy"``;
- :func:`greedy_completions` / :func:`exact_match_accuracy`: greedy decoding with ``model.generate`` (left-padded
  batches, stopping at ``<eos>`` / ``<|end|>``), scored against the clean answer;
- :func:`mean_target_probability`: mean p of the target tokens TRL trains on, through the project's one measurement
  (:func:`trl_prob.measure.measure`);
- :func:`pretrain_on_task`: a plain NLL training loop that makes base models of a chosen strength.

Rebuild the shipped artifacts (deterministic for a given machine / torch version; a minute or two on 2 CPU cores)::

    python benchmarks/addition.py build trl_prob/embedded   # writes OUT/model, OUT/model-weak (+ build_info.json), OUT/data

Import it from a script in ``benchmarks/`` (``from addition import ...``: the script's folder is on ``sys.path``);
the tests have ``benchmarks/`` on ``sys.path`` through pyproject.toml's pytest ``pythonpath``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trl_prob.measure import measure

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
_SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT, END]
_CHARS = list("0123456789+= ")

# The assistant turn's terminator `<|end|>` sits *inside* the generation block: TRL checks that the end-of-turn token
# is part of the assistant mask (otherwise the model is never trained to stop). The template renders a prompt alone
# (with `add_generation_prompt`) as an exact prefix of prompt + completion, which TRL needs to find the completion.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported, got: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

FORMATS = ("prompt_completion", "conversational", "messages")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer (20 tokens: 7 special tokens, digits, ``+``, ``=`` and space).

    Plain text is tokenized one character per token and gets ``<bos>`` prepended (never ``<eos>`` appended: TRL
    appends the EOS text itself, and the prompt alone must tokenize to a prefix of prompt + completion). Characters
    outside the vocabulary map to ``<unk>``. The tokenizer carries :data:`CHAT_TEMPLATE`, whose
    ``{% generation %}`` markers make ``assistant_only_loss=True`` work in TRL.
    """
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS + _CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, END],
        model_max_length=64,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """Config of the tiny Llama (hidden 64, 2 layers, 4 heads, ~0.13M parameters); ``overrides`` replace any field.

    Special-token ids default to those of :func:`build_tokenizer`.
    """
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=_SPECIAL_TOKENS.index(PAD),
        bos_token_id=_SPECIAL_TOKENS.index(BOS),
        eos_token_id=_SPECIAL_TOKENS.index(EOS),
        dtype="float32",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def random_tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A randomly initialised fp32 tiny Llama sized for :func:`build_tokenizer`.

    Its generation config stops on both ``<eos>`` and ``<|end|>`` (the end of a plain completion and of an assistant
    turn). ``overrides`` are forwarded to :func:`tiny_llama_config`.
    """
    tokenizer = build_tokenizer()
    config = tiny_llama_config(len(tokenizer), **overrides)
    # Seed a private generator state only: callers' global RNG streams must not depend on building a model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = stop_ids(tokenizer)
    gen.do_sample = False
    gen.max_new_tokens = 8
    return model


def stop_ids(tokenizer) -> list[int]:
    """The tokens that end a completion: ``<eos>`` (plain text) and ``<|end|>`` (an assistant turn)."""
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)]


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def make_addition_examples(
    n: int,
    noise: float = 0.0,
    seed: int = 0,
    digits: int = 2,
    format: str = "prompt_completion",
    exclude: Iterable[str] = (),
) -> list[dict]:
    """Generate ``n`` addition examples with operands in ``[0, 10**digits)``.

    Args:
        n: Number of examples. Operand pairs are distinct while ``n`` allows it.
        noise: Fraction of examples (exactly ``round(noise * n)``, chosen at random) whose target is replaced by a
            wrong answer drawn uniformly from ``[0, 2 * (10**digits - 1)]``.
        seed: Seed of the generator; the output is a pure function of the arguments.
        digits: Maximum number of digits per operand.
        format: ``"prompt_completion"`` -> ``{"prompt": "37+45=", "completion": "82"}``;
            ``"conversational"`` -> the same as one user / one assistant message
            (``{"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]}``);
            ``"messages"`` -> ``{"messages": [user, assistant]}`` (for ``assistant_only_loss=True``).
        exclude: Prompts (``"37+45="``) that must not be generated, e.g. the test set's, to keep splits disjoint.

    Returns:
        A list of dicts in the chosen format, each with the extra keys ``"answer"`` (clean answer, string) and
        ``"noisy"`` (whether the target is corrupted). Completions do not include the EOS token (TRL adds it).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    rng = random.Random(seed)
    base = 10**digits
    max_sum = 2 * (base - 1)
    excluded = set(exclude)
    n_pairs = base * base
    pairs: list[tuple[int, int]] = []
    if n + len(excluded) <= n_pairs:
        seen: set[int] = set()
        while len(pairs) < n:
            for code in rng.sample(range(n_pairs), min(n_pairs, 2 * (n - len(pairs)) + 16)):
                a, b = divmod(code, base)
                if code in seen or f"{a}+{b}=" in excluded:
                    continue
                seen.add(code)
                pairs.append((a, b))
                if len(pairs) == n:
                    break
    else:  # more examples than distinct pairs: repeats are unavoidable
        while len(pairs) < n:
            a, b = rng.randrange(base), rng.randrange(base)
            if f"{a}+{b}=" not in excluded:
                pairs.append((a, b))
    noisy_idx = set(rng.sample(range(n), round(noise * n)))

    examples = []
    for i, (a, b) in enumerate(pairs):
        prompt, answer = f"{a}+{b}=", str(a + b)
        target = answer
        if i in noisy_idx:
            wrong = rng.randrange(max_sum)  # uniform over the max_sum values other than the true answer
            target = str(wrong if wrong < a + b else wrong + 1)
        if format == "prompt_completion":
            ex: dict[str, Any] = {"prompt": prompt, "completion": target}
        elif format == "conversational":
            ex = {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": target}],
            }
        else:
            ex = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]}
        ex["answer"] = answer
        ex["noisy"] = i in noisy_idx
        examples.append(ex)
    return examples


def prompt_ids(tokenizer, example: Mapping[str, Any]) -> list[int]:
    """Token ids of the prompt the model must complete, rendered exactly as TRL renders it for training."""
    if "messages" in example:
        messages = [m for m in example["messages"] if m["role"] != "assistant"]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    if isinstance(example["prompt"], str):
        return tokenizer(example["prompt"])["input_ids"]
    return tokenizer.apply_chat_template(
        example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def encode(tokenizer, example: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """``(input_ids, target_mask)`` of one example, mirroring what TRL's ``SFTTrainer`` trains on.

    Plain prompt-completion: completion + EOS (TRL appends the EOS text). Conversational: the assistant turn including
    its ``<|end|>`` terminator.
    """
    if "messages" in example:
        out = tokenizer.apply_chat_template(
            example["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])
    if isinstance(example["prompt"], str):
        completion = example["completion"]
        if not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        ids = tokenizer(example["prompt"] + completion)["input_ids"]
    else:
        ids = tokenizer.apply_chat_template(
            example["prompt"] + example["completion"], tokenize=True, return_dict=True
        )["input_ids"]
    prompt_len = len(prompt_ids(tokenizer, example))
    return list(ids), [0] * prompt_len + [1] * (len(ids) - prompt_len)


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt and the padding)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask, strict=True)])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_completions(model, tokenizer, examples: Any, max_new_tokens: int = 6, batch_size: int = 256) -> list[str]:
    """Greedy completions (decoded text up to the first ``<eos>`` / ``<|end|>``) of the examples' prompts.

    ``model.generate`` on left-padded batches of the prompts rendered as TRL renders them (any of the three formats;
    a list of dicts or a ``datasets.Dataset``).
    """
    rows = list(examples)
    stop = stop_ids(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, len(rows), batch_size):
            prompts = [prompt_ids(tokenizer, ex) for ex in rows[start : start + batch_size]]
            batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(device)
            generated = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop,
            )
            for tokens in generated[:, batch["input_ids"].shape[1] :].tolist():
                kept = []
                for t in tokens:
                    if t in stop:
                        break
                    kept.append(t)
                outputs.append(tokenizer.decode(kept, skip_special_tokens=False))
    finally:
        model.train(was_training)
    return outputs


def exact_match_accuracy(
    model, tokenizer, examples: Any, max_new_tokens: int = 6, batch_size: int = 256
) -> float:
    """Fraction of examples whose greedy completion equals the clean ``"answer"`` exactly.

    Works on all three formats (list of dicts or ``datasets.Dataset``). The model must also stop: it is right only if
    it emits a stop token (``<eos>`` / ``<|end|>``) right after the answer, within ``max_new_tokens`` tokens (the
    default covers operands of up to 4 digits).
    """
    rows = list(examples)
    if not rows:
        raise ValueError("no examples")
    completions = greedy_completions(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = sum(c == str(ex["answer"]) for c, ex in zip(completions, rows, strict=True))
    return correct / len(rows)


def mean_target_probability(model, tokenizer, examples: Any, batch_size: int = 256) -> float:
    """Mean probability the model assigns to the target tokens (token-level average over all examples).

    Target tokens are the ones TRL trains on by default: the completion plus EOS for plain prompt-completion data,
    the assistant turn including ``<|end|>`` for conversational data. Scored against the examples' own (possibly
    noisy) targets, with :func:`trl_prob.measure.measure` through TRL's fused log-prob head (added for the call to a
    bare model, and taken off again; a model ``SFTTrainer`` prepared already has it).
    """
    encoded = [encode(tokenizer, ex) for ex in examples]
    device = next(model.parameters()).device
    batches = (
        {k: v.to(device) for k, v in collate(encoded[i : i + batch_size], tokenizer.pad_token_id).items()}
        for i in range(0, len(encoded), batch_size)
    )
    bare = "forward" not in vars(model)  # add_fused_lm_head (and SFTTrainer) patch the instance's forward
    if bare:
        from trl.trainer import add_fused_lm_head

        add_fused_lm_head(model)
    try:
        return measure(model, batches).stats.mean_p
    finally:
        if bare:
            del model.forward


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining (builds base models)
# ----------------------------------------------------------------------------------------------------------------------


def pretrain_on_task(
    model,
    tokenizer,
    examples: Any,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
    *,
    warmup_steps: int = 50,
    weight_decay: float = 0.0,
    until: Callable[[Any], bool] | None = None,
    check_every: int = 100,
):
    """Train ``model`` in place with plain NLL on the target tokens of ``examples``; returns the model.

    A plain torch loop (AdamW, linear warmup then constant learning rate, minibatches sampled with replacement from
    ``examples`` by a generator seeded with ``seed``). Used to make base models of a chosen strength: fix ``steps``,
    or pass ``until`` (called with the model every ``check_every`` steps, in eval mode) to stop as soon as it returns
    ``True`` -- e.g. ``until=lambda m: exact_match_accuracy(m, tok, val) >= 0.5``. Deterministic for a given seed on
    a given machine. Examples may be in any of the formats of :func:`make_addition_examples`, mixed.
    """
    encoded = [encode(tokenizer, ex) for ex in examples]
    if not encoded:
        raise ValueError("no examples")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        batch = collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite loss at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if until is not None and step % check_every == 0:
            model.eval()
            stop = until(model)
            model.train()
            if stop:
                break
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Rebuilding the shipped model and data: `python benchmarks/addition.py build OUT`
# ----------------------------------------------------------------------------------------------------------------------

# Disjoint seeds for every data stream; the pretraining data never shares a seed with the shipped train set.
TEST_SEED, TRAIN_SEED, VAL_SEED, PRETRAIN_DATA_SEED, MODEL_SEED, PRETRAIN_SEED = 101, 202, 303, 404, 0, 0
N_TRAIN, N_TEST, N_VAL, N_PRETRAIN, NOISE, DIGITS = 2000, 200, 300, 6000, 0.2, 2
# Stop pretraining once clean validation accuracy reaches this: high enough for the "strong end" of the capability
# continuum, low enough that the model is not saturated (its mean target probability on the noisy train set lands
# around 0.75, leaving room for the objectives under study to differ).
TARGET_VAL_ACCURACY = 0.7
MAX_STEPS, CHECK_EVERY, LR, BATCH_SIZE = 5000, 50, 3e-3, 128
# The weak checkpoint (OUT/model-weak, the quickstart's base): the same pretraining stopped early, where the model has
# seen the task but cannot do it (exact match ~0.01) and its mean target probability on the noisy train set (~0.44)
# lies inside the adaptive schedule's default ramp 0.30 -> 0.55.
WEAK_STEPS = 100


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(out: str) -> dict:
    """Build the shipped data and model into ``out`` (``out/model``, ``out/data``); returns the measured metrics."""
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
        if steps_done == WEAK_STEPS:
            save_weak(m, acc)
        return acc >= TARGET_VAL_ACCURACY

    def save_weak(m, val_accuracy: float) -> None:
        weak_dir = os.path.join(out, "model-weak")
        os.makedirs(weak_dir, exist_ok=True)
        m.save_pretrained(weak_dir)
        tokenizer.save_pretrained(weak_dir)
        weak_metrics = {
            "val_exact_match": val_accuracy,
            "test_exact_match": exact_match_accuracy(m, tokenizer, test),
            "train_mean_target_probability": mean_target_probability(m, tokenizer, train),
            "test_mean_target_probability": mean_target_probability(m, tokenizer, test),
        }
        weak_info = {"pretraining": {"steps": WEAK_STEPS, "lr": LR, "batch_size": BATCH_SIZE},
                     "metrics": {k: round(v, 4) for k, v in weak_metrics.items()}, "torch": torch.__version__}
        with open(os.path.join(weak_dir, "build_info.json"), "w", encoding="utf-8") as f:
            json.dump(weak_info, f, indent=2, sort_keys=True)
            f.write("\n")

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
    parser = argparse.ArgumentParser(prog="python benchmarks/addition.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="build the embedded default's model and data")
    build_parser.add_argument("out", help="output directory; trl_prob/embedded overwrites the shipped artifacts")
    args = parser.parse_args(argv)
    metrics = build(args.out)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if metrics["val_exact_match"] < TARGET_VAL_ACCURACY:
        print(f"warning: pretraining stopped at MAX_STEPS={MAX_STEPS} below the target accuracy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
