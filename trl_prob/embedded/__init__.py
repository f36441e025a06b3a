"""The embedded default: a tiny model that already knows its task, and that task's data, shipped in the package.

The task is 2-digit integer addition: prompt ``"37+45="``, completion ``"82"``. Both directories load offline:

- :func:`default_model_path` -- a tiny character-level Llama (0.13M parameters) and its tokenizer, for
  ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. It was pretrained on *clean*
  addition until moderately good at it (exact match 0.69 on the clean test split; ``build_info.json`` has the
  measurements). Its tokenizer carries a chat template, so conversational data works too.
- :func:`weak_model_path` -- the same model earlier in its pretraining (step 100: exact match 0.01, mean target
  probability 0.44 on the training data), where the adaptive schedule starts between NLL and the objective.
- :func:`default_dataset_path` -- ``train.jsonl`` (2000 prompt-completion examples, 20% of the targets replaced by a
  wrong sum) and ``test.jsonl`` (200 clean ones, disjoint from train). ``datasets.load_dataset(default_dataset_path())``
  returns a ``DatasetDict`` with ``train`` and ``test``. Every row also carries ``"answer"`` (the clean answer) and
  ``"noisy"`` (whether its target was corrupted); completions never contain the EOS token (TRL appends it).

Example::

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_prob.embedded import default_dataset_path, default_model_path

    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    data = load_dataset(default_dataset_path())

The code that built them (tokenizer, data generator, pretraining, exact-match scoring) is not installed: it lives in
the repository's ``benchmarks/addition.py``, with the rebuild command ``python benchmarks/addition.py build OUT``.
"""

from __future__ import annotations

import os

__all__ = ["default_dataset_path", "default_model_path", "weak_model_path"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def default_model_path() -> str:
    """Directory of the shipped pretrained tiny model and its tokenizer (``from_pretrained``-loadable, offline)."""
    return os.path.join(_HERE, "model")


def weak_model_path() -> str:
    """Directory of a weaker checkpoint of the same tiny model: its pretraining stopped at step 100 (exact match 0.01,
    mean target probability 0.44 on the training data, inside the adaptive schedule's default ramp 0.30 -> 0.55). The
    quickstart fine-tunes it, so that the schedule starts between NLL and the objective and visibly moves."""
    return os.path.join(_HERE, "model-weak")


def default_dataset_path() -> str:
    """Directory of the shipped data: ``train.jsonl`` (20% label noise) and ``test.jsonl`` (clean).

    ``datasets.load_dataset(default_dataset_path())`` gives a ``DatasetDict`` with ``train`` and ``test``; equivalently
    ``load_dataset("json", data_files={"train": ..., "test": ...})``.
    """
    return os.path.join(_HERE, "data")
