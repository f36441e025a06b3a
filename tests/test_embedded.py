"""The embedded default: the shipped model + data (installed), and the builders that made them (benchmarks/addition.py:
tokenizer, chat template, data generator, generation-based scoring, pretraining). Offline, CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from addition import (  # noqa: E402
    build_tokenizer,
    exact_match_accuracy,
    greedy_completions,
    make_addition_examples,
    mean_target_probability,
    pretrain_on_task,
    prompt_ids,
    random_tiny_llama,
    stop_ids,
    tiny_llama_config,
)
from _launch import python  # noqa: E402
from trl_prob.embedded import default_dataset_path, default_model_path  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def shipped():
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


@pytest.fixture(scope="module")
def shipped_data():
    return load_dataset(default_dataset_path())


def test_tokenizer_round_trips_and_is_tiny(tok):
    text = "37+45=82"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids  # BOS only: TRL appends the EOS text itself
    assert len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text + tok.eos_token)["input_ids"] == ids + [tok.eos_token_id]
    assert tok.decode(tok(" 1 0 ")["input_ids"], skip_special_tokens=True) == " 1 0 "
    assert tok.pad_token and tok.bos_token and tok.eos_token
    assert len(tok) <= 30


def test_chat_template_assistant_mask(tok):
    messages = make_addition_examples(1, format="messages")[0]["messages"]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = out["assistant_masks"]
    assert 1 in mask
    masked = [t for t, m in zip(out["input_ids"], mask, strict=True) if m]
    # The assistant content and its end-of-turn marker, nothing else.
    assert tok.decode(masked) == messages[1]["content"] + "<|end|>"
    # The prompt rendered for generation is a prefix of the full conversation (TRL relies on it).
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]


def test_trl_considers_stop_token_trained(tok):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.5])
def test_noise_fraction(noise):
    rows = make_addition_examples(1000, noise=noise, seed=3)
    noisy = [r for r in rows if r["completion"] != r["answer"]]
    assert abs(len(noisy) / len(rows) - noise) <= 0.02
    assert all(r["noisy"] == (r["completion"] != r["answer"]) for r in rows)
    clean = [r for r in rows if not r["noisy"]]
    assert all(int(r["answer"]) == sum(map(int, r["prompt"][:-1].split("+"))) for r in clean)


def test_generator_formats_and_determinism():
    pc = make_addition_examples(20, noise=0.3, seed=7)
    conv = make_addition_examples(20, noise=0.3, seed=7, format="conversational")
    msgs = make_addition_examples(20, noise=0.3, seed=7, format="messages")
    assert pc == make_addition_examples(20, noise=0.3, seed=7)
    assert pc != make_addition_examples(20, noise=0.3, seed=8)
    for a, b, c in zip(pc, conv, msgs, strict=True):
        assert not a["completion"].endswith("<eos>")
        assert b["prompt"] == [{"role": "user", "content": a["prompt"]}]
        assert b["completion"] == [{"role": "assistant", "content": a["completion"]}]
        assert c["messages"] == b["prompt"] + b["completion"]
        assert a["answer"] == b["answer"] == c["answer"]
    excluded = {r["prompt"] for r in pc}
    assert not excluded & {r["prompt"] for r in make_addition_examples(200, seed=7, exclude=excluded)}


def test_random_model_config(tok):
    model = random_tiny_llama(seed=0)
    assert model.config.vocab_size == len(tok) and not model.config.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.float32
    assert tiny_llama_config(len(tok), num_hidden_layers=1).num_hidden_layers == 1
    same = random_tiny_llama(seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), same.parameters(), strict=True))


def test_shipped_dataset_loads(shipped_data):
    assert set(shipped_data) == {"train", "test"}
    train, test = shipped_data["train"], shipped_data["test"]
    assert {"prompt", "completion", "answer", "noisy"} <= set(train.column_names)
    assert not any(test["noisy"])
    assert 0.1 <= sum(train["noisy"]) / len(train) <= 0.3
    assert not set(train["prompt"]) & set(test["prompt"])


def test_shipped_model_beats_random_model(shipped, shipped_data):
    model, tokenizer = shipped
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert tokenizer.chat_template is not None
    test, train = shipped_data["test"], shipped_data["train"]
    random_model = random_tiny_llama(seed=0)
    acc, acc_random = exact_match_accuracy(model, tokenizer, test), exact_match_accuracy(random_model, tokenizer, test)
    assert acc > acc_random
    subset = train.select(range(200))
    assert mean_target_probability(model, tokenizer, subset) > mean_target_probability(random_model, tokenizer, subset)


def test_pretrain_on_task_is_deterministic_and_learns(tok):
    data = make_addition_examples(64, seed=0, digits=1)
    models = [pretrain_on_task(random_tiny_llama(seed=1), tok, data, steps=15, lr=3e-3, batch_size=16, seed=0)
              for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True))
    before = mean_target_probability(random_tiny_llama(seed=1), tok, data)
    assert mean_target_probability(models[0], tok, data) > before


def test_the_installed_package_ships_the_artifacts_not_the_builders():
    import trl_prob.embedded as embedded

    assert embedded.__all__ == ["default_dataset_path", "default_model_path", "weak_model_path"]
    for name in ("pretrain_on_task", "build_tokenizer", "random_tiny_llama", "make_addition_examples",
                 "greedy_completions", "exact_match_accuracy", "mean_target_probability"):
        assert not hasattr(embedded, name), name
    here = os.path.dirname(embedded.__file__)
    assert [f for f in os.listdir(here) if f.endswith(".py")] == ["__init__.py"]  # no `python -m` builder either
    assert os.path.isfile(os.path.join(default_model_path(), "model.safetensors"))
    assert sorted(os.listdir(default_dataset_path())) == ["test.jsonl", "train.jsonl"]
    # The module imports nothing heavy: in a fresh interpreter, `import trl_prob.embedded` (the package's exports are
    # lazy) leaves torch, transformers, tokenizers and trl unimported.
    code = (
        "import sys\n"
        "from trl_prob.embedded import default_model_path\n"
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'trl') if m in sys.modules))\n"
        "print(default_model_path())\n"
    )
    out = python("-c", code, timeout=120, check=True)
    assert out.stdout.splitlines() == ["[]", default_model_path()]


def _stepwise_argmax(model, tokenizer, example, max_new_tokens=6) -> str:
    # Reference decoding: one prompt at a time, no cache, no padding, argmax of the full logits at each step.
    ids, kept = list(prompt_ids(tokenizer, example)), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in stop_ids(tokenizer):
                break
            ids.append(token)
            kept.append(token)
    return tokenizer.decode(kept, skip_special_tokens=False)


@pytest.mark.parametrize("format", ["prompt_completion", "messages"])
def test_generate_exact_match_agrees_with_stepwise_argmax(shipped, format):
    model, tokenizer = shipped
    # 1- and 2-digit operands: prompts of several lengths, so the batches are left-padded.
    rows = make_addition_examples(24, seed=11, format=format) + make_addition_examples(8, seed=11, digits=1,
                                                                                        format=format)
    assert len({len(prompt_ids(tokenizer, ex)) for ex in rows}) > 1
    reference = [_stepwise_argmax(model, tokenizer, ex) for ex in rows]
    assert greedy_completions(model, tokenizer, rows, batch_size=10) == reference
    correct = sum(c == ex["answer"] for c, ex in zip(reference, rows, strict=True))
    assert 0 < correct < len(rows)  # a mix of right and wrong answers: the comparison says something
    assert exact_match_accuracy(model, tokenizer, rows, batch_size=10) == correct / len(rows)


def test_mean_target_probability_matches_full_logits_and_leaves_the_model_bare(shipped, shipped_data):
    model, tokenizer = shipped
    rows = shipped_data["train"].select(range(16))
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in rows:
            ids = tokenizer(ex["prompt"] + ex["completion"] + tokenizer.eos_token)["input_ids"]
            start = len(tokenizer(ex["prompt"])["input_ids"])
            log_p = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            total += sum(log_p[i - 1, ids[i]].exp().item() for i in range(start, len(ids)))
            count += len(ids) - start
    assert mean_target_probability(model, tokenizer, rows, batch_size=5) == pytest.approx(total / count, abs=1e-6)
    assert "forward" not in vars(model)  # the fused head was added for the call only


def test_the_weak_checkpoint_starts_inside_the_default_ramp():
    """The quickstart's base: its mean target probability on the shipped training data lies between the adaptive
    schedule's default p_low and p_high (so lambda starts strictly between NLL and the objective), and it cannot do
    the task yet, unlike the default model."""
    from addition import exact_match_accuracy, mean_target_probability
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_prob import ProbSFTConfig
    from trl_prob.embedded import weak_model_path

    defaults = ProbSFTConfig(output_dir="unused", objective="p", objective_schedule="adaptive")
    data = load_dataset(default_dataset_path())
    model, tok = AutoModelForCausalLM.from_pretrained(weak_model_path()), AutoTokenizer.from_pretrained(weak_model_path())
    train = [dict(row) for row in data["train"].select(range(512))]
    assert defaults.schedule_ramp_low < mean_target_probability(model, tok, train) < defaults.schedule_ramp_high
    test = [dict(row) for row in data["test"]]
    strong = AutoModelForCausalLM.from_pretrained(default_model_path())
    assert exact_match_accuracy(model, tok, test) < 0.05 < 0.5 < exact_match_accuracy(strong, tok, test)
