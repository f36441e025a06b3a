"""The embedded default: a tiny model that already knows its task, and that task's data, shipped in the package.

The task is integer addition (prompt ``"37+45="``, completion ``"82"``). Everything here is built locally (no model
hub): a character-level tokenizer, a tiny Llama, data generators with optional label noise, a greedy exact-match
scorer, and a plain training loop used to make base models of a chosen strength.

Shipped artifacts (regenerate with ``python -m trl_prob.embedded build``):

- :func:`default_model_path` -- a directory loadable offline with ``AutoModelForCausalLM.from_pretrained`` and
  ``AutoTokenizer.from_pretrained``. The model is pretrained on *clean* addition data until it is moderately good at
  the task (the "strong end" of the capability continuum).
- :func:`default_dataset_path` -- a directory with ``train.jsonl`` (prompt-completion, 20% label noise) and
  ``test.jsonl`` (clean). ``datasets.load_dataset(default_dataset_path())`` returns a ``DatasetDict`` with ``train``
  and ``test`` splits (the split names are inferred from the file names; this works offline).

Every example also carries ``"answer"`` (the clean answer, a string) and ``"noisy"`` (whether its target was
corrupted), so accuracy is always scored against the truth. Completions never contain the EOS token: TRL's
``SFTTrainer`` appends ``tokenizer.eos_token`` to string completions itself (only if it is not already there), and for
conversational data the chat template closes the assistant turn with ``<|end|>``.

Example::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from datasets import load_dataset
    from trl_prob import embedded

    model = AutoModelForCausalLM.from_pretrained(embedded.default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(embedded.default_model_path())
    data = load_dataset(embedded.default_dataset_path())
    embedded.exact_match_accuracy(model, tokenizer, data["test"])
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "default_dataset_path",
    "default_model_path",
    "exact_match_accuracy",
    "greedy_completions",
    "make_addition_examples",
    "mean_target_probability",
    "pretrain_on_task",
    "random_tiny_llama",
    "tiny_llama_config",
]

_HERE = os.path.dirname(os.path.abspath(__file__))

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
    gen.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)]
    gen.do_sample = False
    gen.max_new_tokens = 8
    return model


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


def _rows(examples: Any) -> list[Mapping[str, Any]]:
    # Accept a list of dicts or a `datasets.Dataset` (iterating a Dataset yields dicts).
    return list(examples)


def _prompt_ids(tokenizer, example: Mapping[str, Any]) -> list[int]:
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


def _encode(tokenizer, example: Mapping[str, Any]) -> tuple[list[int], list[int]]:
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
    prompt_len = len(_prompt_ids(tokenizer, example))
    return list(ids), [0] * prompt_len + [1] * (len(ids) - prompt_len)


def _collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    # Right padding; `labels` already shifted-compatible (HF shifts internally), -100 outside targets.
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask, strict=True)])
    return input_ids, attention, labels


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def _stop_ids(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)}


@torch.no_grad()
def greedy_completions(model, tokenizer, examples: Any, max_new_tokens: int = 6, batch_size: int = 256) -> list[str]:
    """Greedy completions (decoded text up to the first ``<eos>`` / ``<|end|>``) for the examples' prompts.

    Prompts are grouped by token length, so batches need no padding (no position-id subtleties) and the result is
    identical to decoding one example at a time.
    """
    rows = _rows(examples)
    stop = _stop_ids(tokenizer)
    device = next(model.parameters()).device
    stop_tensor = torch.tensor(sorted(stop), device=device)
    was_training = model.training
    model.eval()
    prompts = [_prompt_ids(tokenizer, ex) for ex in rows]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    outputs: list[str] = [""] * len(rows)
    for idx in by_len.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            generated = []
            past = None
            step_input = ids
            for _ in range(max_new_tokens):
                out = model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1)
                generated.append(nxt)
                done |= torch.isin(nxt, stop_tensor)
                if bool(done.all()):
                    break
                step_input = nxt[:, None]
            gen = torch.stack(generated, 1).tolist()
            for row, tokens in zip(chunk, gen, strict=True):
                kept = []
                for t in tokens:
                    if t in stop:
                        break
                    kept.append(t)
                outputs[row] = tokenizer.decode(kept, skip_special_tokens=False)
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
    rows = _rows(examples)
    if not rows:
        raise ValueError("no examples")
    completions = greedy_completions(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = sum(c == str(ex["answer"]) for c, ex in zip(completions, rows, strict=True))
    return correct / len(rows)


@torch.no_grad()
def mean_target_probability(model, tokenizer, examples: Any, batch_size: int = 256) -> float:
    """Mean probability the model assigns to the target tokens (token-level average over all examples).

    Target tokens are the ones TRL trains on by default: the completion plus EOS for plain prompt-completion data,
    the assistant turn including ``<|end|>`` for conversational data. Scored against the examples' own (possibly
    noisy) targets.
    """
    rows = _rows(examples)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    encoded = [_encode(tokenizer, ex) for ex in rows]
    for start in range(0, len(encoded), batch_size):
        input_ids, attention, labels = (
            t.to(device) for t in _collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
        )
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != -100
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
        total += logp.exp()[mask].sum().item()
        count += int(mask.sum())
    model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining (builds base models; not the product)
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
    encoded = [_encode(tokenizer, ex) for ex in _rows(examples)]
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
        input_ids, attention, labels = (
            t.to(device) for t in _collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        )
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
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
# Shipped artifacts
# ----------------------------------------------------------------------------------------------------------------------


def default_model_path() -> str:
    """Directory of the shipped pretrained tiny model and its tokenizer (``from_pretrained``-loadable, offline)."""
    return os.path.join(_HERE, "model")


def default_dataset_path() -> str:
    """Directory of the shipped data: ``train.jsonl`` (20% label noise) and ``test.jsonl`` (clean).

    ``datasets.load_dataset(default_dataset_path())`` gives a ``DatasetDict`` with ``train`` and ``test``; equivalently
    ``load_dataset("json", data_files={"train": ..., "test": ...})``.
    """
    return os.path.join(_HERE, "data")
