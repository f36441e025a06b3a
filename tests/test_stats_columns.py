"""Only the statistics a run reads are computed (issue 35): each signal's declared column groups give the same reading
as every column, the groups nobody asks for stay 0, and a trainer computes what its signal, schedule and extension
read, with the same training and logs as when it computed everything."""

from __future__ import annotations

import math

import pytest
import torch

import trl_prob.experimental  # noqa: F401  (registers the lab's signals: their declarations are checked too)
from trl_prob.schedules import SIGNALS
from trl_prob.stats import (
    _CONFLICTS, _HIST, _SEQS_TOP1, _SEQS_TOP1_CLEAN, _SUM_ENTROPY, _TOP1, ALL_COLUMNS, COLUMN_GROUPS, WIDTH,
    TokenProbStats, column_groups,
)  # fmt: skip

from conftest import make_trainer


def _head(seed=0, rows=24, length=9, vocab=6):
    """Log p of targets and every head output, from full distributions, with some completions exact throughout and
    some confident conflicts; padding by a mask."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, vocab, generator=generator) * torch.rand(rows, 1, 1, generator=generator) * 6
    targets = torch.randint(0, vocab, (rows, length), generator=generator)
    targets[: rows // 4] = logits[: rows // 4].argmax(-1)
    mask = torch.rand(rows, length, generator=generator) > 0.2
    probs = logits.softmax(-1)
    return dict(
        log_p=probs.gather(-1, targets[..., None]).squeeze(-1).log(), mask=mask, is_top1=logits.argmax(-1) == targets,
        entropy=-(probs * probs.log()).sum(-1), log_sum_sq_probs=probs.pow(2).sum(-1).log(), vocab_size=vocab,
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_each_signal_reads_the_same_from_its_columns_as_from_all(name):
    signal = SIGNALS[name]
    head = _head(seed=len(name))
    everything = TokenProbStats.of(**head)
    only = TokenProbStats.of(**head, columns=signal.columns)
    full, read = signal.read(everything), signal.read(only)
    assert not math.isnan(full)
    assert read == pytest.approx(full, abs=0), f"{name} declares {sorted(signal.columns)} but reads more"


def test_groups_not_asked_for_stay_zero_and_the_base_is_computed_either_way():
    head = _head()
    everything = TokenProbStats.of(**head).sums
    base = TokenProbStats.of(**head, columns=frozenset()).sums
    assert everything[_HIST:].sum() > 0 and base[_HIST:].sum() == 0  # no histogram
    for column in (_TOP1, _SEQS_TOP1, _SUM_ENTROPY, _CONFLICTS, _SEQS_TOP1_CLEAN):
        assert everything[column] > 0 and base[column] == 0
    stats = TokenProbStats(base)
    assert stats.mean_p == TokenProbStats(everything).mean_p and stats.nll == TokenProbStats(everything).nll
    assert base.shape == (WIDTH,)  # the same row layout: one all-reduce, one checkpointed shape
    top1 = TokenProbStats.of(**head, columns=frozenset({"top1"})).sums
    assert top1[_SEQS_TOP1] == everything[_SEQS_TOP1] and top1[_HIST:].sum() == 0 and top1[_CONFLICTS] == 0


def test_a_group_brings_the_groups_it_is_computed_from_and_unknown_names_are_refused():
    assert column_groups(["top1_clean"]) == {"top1_clean", "top1", "sum_sq"}
    assert column_groups(ALL_COLUMNS) == set(COLUMN_GROUPS)
    with pytest.raises(ValueError, match=r"'histo'.*allowed: confident, top1"):
        column_groups(["histo"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(objective="p"), set()),  # fixed objective: no schedule reads anything beyond the logged base columns
        (dict(objective="p", objective_schedule="adaptive"), {"top1"}),  # the default signal, sequence_top1
        (dict(objective="p", objective_schedule="adaptive", schedule_signal="mean"), set()),
        (dict(objective="p", objective_schedule="linear", schedule_signal="token_top1"), {"top1"}),
    ],
)
def test_a_trainer_computes_what_its_schedule_reads(tmp_path, tokenizer, tiny_model, overrides, expected):
    hook = make_trainer(tmp_path, tokenizer, tiny_model, **overrides).objective_hook
    assert hook.stats_columns == expected
    assert hook.eval_stats_columns == expected | {"top1"}  # eval_exact_match


def test_a_per_source_run_computes_what_its_sources_read(tmp_path, tokenizer, tiny_model):
    from datasets import Dataset

    from trl_prob import ProbSFTTrainer
    from trl_prob.experimental import ExperimentalSFTConfig

    from conftest import addition_dataset, base_args

    rows = addition_dataset(16).to_list()
    data = Dataset.from_list([dict(row, source="a" if i % 2 else "b") for i, row in enumerate(rows)])
    args = ExperimentalSFTConfig(**base_args(tmp_path, bf16=False), objective="p", objective_schedule="adaptive",
                                 schedule_signal="mean", schedule_per_source=True, source_column="source",
                                 schedule_source_signal="a=median")  # fmt: skip
    trainer = ProbSFTTrainer(model=tiny_model, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.objective_hook.stats_columns == {"histogram"}  # median for a, mean for b


@pytest.mark.parametrize("signal", ["sequence_top1", "token_top1", "mean"])
def test_training_on_the_read_columns_equals_training_on_all(tmp_path, tokenizer, signal, monkeypatch):
    """The same run twice, once computing every column (as before issue 35): same lambdas, same logs, same weights."""
    from addition import random_tiny_llama

    from trl_prob.hook import ObjectiveHook

    def run(name):
        trainer = make_trainer(tmp_path / name, tokenizer, random_tiny_llama(seed=0), objective="p",
                               objective_schedule="adaptive", schedule_signal=signal, schedule_ramp_low=0.0,
                               schedule_ramp_high=0.2, max_steps=4)  # fmt: skip
        trainer.train()
        logs = [{k: v for k, v in entry.items() if k not in ("train_runtime", "train_samples_per_second",
                                                              "train_steps_per_second")}
                for entry in trainer.state.log_history]  # fmt: skip
        return logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    read_logs, read_weights = run("read")
    monkeypatch.setattr(ObjectiveHook, "stats_columns", property(lambda self: ALL_COLUMNS))
    all_logs, all_weights = run("all")
    assert read_logs == all_logs
    metric = SIGNALS[signal].metric or "mean_token_prob"
    readings = [entry[metric] for entry in read_logs if metric in entry]
    assert readings and all(math.isfinite(x) for x in readings)  # read from computed columns (a missing one: NaN)
    if signal != "sequence_top1":  # a random tiny model writes no completion exactly: its lambda stays 0
        assert any(entry.get("objective_lambda", 0) > 0 for entry in read_logs)  # the reading moved lambda
    for name, weight in read_weights.items():
        torch.testing.assert_close(weight, all_weights[name], rtol=0, atol=0)
