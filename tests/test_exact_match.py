"""``eval_exact_match``: the share of evaluation completions whose every target token is the model's first choice,
from the fused head's ``is_top1`` in the evaluation's one forward pass. Checked against greedy decoding, the thing it
stands for: a completion counts if and only if ``generate(do_sample=False)`` writes it token for token."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import addition_dataset, base_args  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_prob import ProbSFTConfig, ProbSFTTrainer  # noqa: E402
from trl_prob.embedded import default_model_path  # noqa: E402


def greedy_exact_match(model, tokenizer, rows) -> float:
    """Greedy decoding, one row at a time: does the model write the completion (and its EOS) exactly?"""
    hits = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        full = tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
        assert full[: len(prompt)] == prompt  # the character tokenizer: the prompt is a prefix
        target = full[len(prompt):]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(target), do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        hits.append(out[0, len(prompt):].tolist() == target)
    return sum(hits) / len(hits)


@pytest.mark.parametrize("objective", ["nll", "p"])
def test_eval_exact_match_equals_greedy_decoding(tmp_path, objective):
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    rows = addition_dataset(n=48, noise=0.25, seed=7)  # some labels wrong: the model cannot write those
    trainer = ProbSFTTrainer(model=model, args=ProbSFTConfig(**base_args(tmp_path, objective=objective, bf16=False,
                                                                         per_device_eval_batch_size=5)),
                             train_dataset=addition_dataset(n=8), eval_dataset=rows, processing_class=tokenizer)
    measured = trainer.evaluate()["eval_exact_match"]
    expected = greedy_exact_match(trainer.model.eval(), tokenizer, rows)
    assert 0.0 < expected < 1.0  # the rows exercise both outcomes
    assert measured == pytest.approx(expected, abs=1e-12)
