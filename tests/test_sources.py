"""Per-source schedules: each data source gets its own adaptive lambda, applied to its own tokens.

References are computed another way: the per-token loss against each source's rows run alone with a float lambda;
the per-source statistics against each source's rows measured alone; a training step's loss against a full-logits
forward of the same batch; one source against the run-wide schedule; a resumed run against an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from trl_prob.experimental import ExperimentalSFTConfig  # noqa: E402  (the research knobs these tests use)
from trl_prob.head import HeadTokens  # noqa: E402
from conftest import addition_dataset, base_args  # noqa: E402
from datasets import Dataset, concatenate_datasets  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from addition import mean_target_probability  # noqa: E402
from trl_prob import ProbSFTConfig, ProbSFTTrainer  # noqa: E402
from trl_prob.embedded import default_model_path  # noqa: E402
from trl_prob.loss import objective_loss  # noqa: E402
from trl_prob.measure import num_samples, sample_index  # noqa: E402
from trl_prob.objectives import get_objective  # noqa: E402
from trl_prob.experimental.sources import MAX_SOURCES, SOURCE_ID, SourceStats, token_lambdas  # noqa: E402
from trl_prob.stats import TokenProbStats  # noqa: E402
from trl_prob.checkpoints import CheckpointError  # noqa: E402

# ------------------------------------------------------------------------------------------------- the pure parts


def random_batch(rows=6, width=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(rows, width, 13, generator=generator)
    targets = torch.randint(0, 13, (rows, width), generator=generator)
    mask = torch.rand(rows, width, generator=generator) < 0.8
    return logits.requires_grad_(True), targets, mask


def target_log_p(logits, targets, mask):
    log_p = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return torch.where(mask, log_p, 0.0)


@pytest.mark.parametrize("spec, mode", [("p", "blend"), ("power:10", "blend"), ("dft", "blend"), ("power:4", "exponent")])
def test_per_token_lambda_equals_each_row_with_its_own_float_lambda(spec, mode):
    logits, targets, mask = random_batch()
    sources = torch.tensor([0, 1, 2, 1, 0, 2])
    lambdas = torch.tensor([0.0, 0.35, 1.0])
    objective = get_objective(spec)
    log_p = target_log_p(logits, targets, mask)
    got, _ = objective_loss(HeadTokens(log_p, mask), objective, lambdas[sources][:, None], mode,
                            group=lambda rows: SourceStats.from_rows(rows, sources, 3))
    (got_grad,) = torch.autograd.grad(got.sum(), logits, retain_graph=True)

    rows = []
    for row in range(len(sources)):
        loss, _ = objective_loss(HeadTokens(log_p[row : row + 1], mask[row : row + 1]), objective, float(lambdas[sources[row]]), mode)
        rows.append(loss)
    want = torch.cat(rows)
    (want_grad,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)


def test_source_statistics_equal_each_source_measured_alone():
    logits, targets, mask = random_batch(rows=7, seed=3)
    log_p = target_log_p(logits, targets, mask).detach()
    sources = torch.tensor([1, 0, 1, 1, 0, 2, 1])
    keep = get_objective("top_p:0.3").keep(log_p) & mask
    _, by_source = objective_loss(HeadTokens(log_p, mask), get_objective("top_p:0.3"), 1.0,
                                  group=lambda rows: SourceStats.from_rows(rows, sources, 4))
    assert isinstance(by_source, SourceStats) and by_source.num_sources == 4
    for source in range(4):
        rows = sources == source
        alone = TokenProbStats.of(log_p[rows], mask[rows], keep[rows])
        torch.testing.assert_close(by_source[source].sums, alone.sums)
    assert by_source[3].num_tokens == 0
    torch.testing.assert_close(by_source.total.sums, TokenProbStats.of(log_p, mask, keep).sums)


# ------------------------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def shipped_model():
    return AutoModelForCausalLM.from_pretrained(default_model_path())


def reversed_answers(dataset: Dataset) -> Dataset:
    """Addition with every answer written backwards: the shipped model (trained on addition) is weak on it."""
    return dataset.map(lambda row: {"completion": row["completion"][::-1]})


def mixture(n=16, seed=0) -> Dataset:
    """Rows of two sources, interleaved: ``add`` (the shipped model is strong) and ``rev`` (it is weak)."""
    add = addition_dataset(n, noise=0.0, seed=seed).add_column("source", ["add"] * n)
    rev = reversed_answers(addition_dataset(n, noise=0.0, seed=seed + 1)).add_column("source", ["rev"] * n)
    rows = [row for pair in zip(add, rev) for row in pair]
    return Dataset.from_list(rows)


# A ramp around the shipped model's statistics on the two sources, so each source's lambda sits inside (0, 1).
PER_SOURCE = dict(
    objective="p",
    objective_schedule="adaptive",
    schedule_per_source=True,
    schedule_ramp_low=0.2,
    schedule_ramp_high=0.95,
    schedule_ema_decay=0.5,
    schedule_warm_start_samples=32,
    schedule_signal="mean",  # the references below compute mean p; the default signal's own test is further down
    bf16=False,  # a CPU with native bf16 would autocast training but not the references below
)


def make(tmp_path, dataset, tokenizer, **overrides):
    args = ExperimentalSFTConfig(**base_args(tmp_path, **{**PER_SOURCE, **overrides}))
    return ProbSFTTrainer(model=shipped_model(), args=args, train_dataset=dataset, processing_class=tokenizer)


def step_logs(trainer):
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


def test_one_source_is_the_run_wide_schedule(tmp_path, shipped_tokenizer):
    dataset = addition_dataset(32).add_column("source", ["only"] * 32)
    per_source = make(tmp_path / "per", dataset, shipped_tokenizer, max_steps=5)
    per_source.train()
    global_run = make(tmp_path / "global", dataset, shipped_tokenizer, max_steps=5, schedule_per_source=False)
    global_run.train()
    a, b = step_logs(per_source), step_logs(global_run)
    lambdas = [entry["objective_lambda"] for entry in b.values()]
    assert all(0.0 < lam < 1.0 for lam in lambdas), lambdas
    for step in b:
        for key in ("loss", "mean_token_prob", "schedule_signal_ema", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)  # the same bits: one source is the global schedule
        # logged per-source as the step's token-weighted mean lambda: equal up to that mean's rounding
        assert a[step]["objective_lambda"] == pytest.approx(b[step]["objective_lambda"], rel=1e-12)
        assert a[step]["objective_lambda/only"] == pytest.approx(b[step]["objective_lambda"], rel=1e-6)
        assert a[step]["mean_token_prob/only"] == pytest.approx(b[step]["mean_token_prob"], rel=1e-9)


def test_each_source_trains_with_its_own_lambda(tmp_path, shipped_tokenizer):
    dataset = mixture(16)
    trainer = make(tmp_path, dataset, shipped_tokenizer, per_device_train_batch_size=32, max_steps=1,
                   learning_rate=1e-9)  # fmt: skip
    assert trainer.extension.names == ["add", "rev"]

    # The warm start: each source's statistic equals that source's rows measured alone.
    model = shipped_model()
    rows = [{k: v for k, v in row.items() if k != "source"} for row in dataset]
    alone = {name: [r for r, row in zip(rows, dataset) if row["source"] == name] for name in trainer.extension.names}
    trainer.train()
    warm = {name: mean_target_probability(model, shipped_tokenizer, alone[name]) for name in trainer.extension.names}
    state = trainer.extension.lambdas.state_dict()
    lambdas = {}
    for name in trainer.extension.names:
        schedule = trainer.extension.lambdas.schedules[trainer.extension.names.index(name)]
        # step 1's lambda is the warm start's; p_ema moved once since: undo that step from the logged statistic
        logged = step_logs(trainer)[1]
        lambdas[name] = logged[f"objective_lambda/{name}"]
        p_warm = (state[name]["p_ema"] - (1 - schedule.ema_decay) * logged[f"mean_token_prob/{name}"]) / schedule.ema_decay
        assert p_warm == pytest.approx(warm[name], rel=1e-5), name
        assert lambdas[name] == pytest.approx((warm[name] - 0.2) / 0.75, rel=1e-5)
    assert 0.0 < lambdas["rev"] < lambdas["add"] < 1.0, lambdas

    # The step's loss: (1 - lambda_s) nll + lambda_s (1 - p) per token, lambda_s of its row's source, from full logits.
    batch = next(iter(trainer.get_train_dataloader()))
    labels, sources = batch["labels"][:, 1:], batch[SOURCE_ID]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    mask = labels != -100
    log_p = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    lam = torch.tensor([lambdas[name] for name in trainer.extension.names], dtype=torch.float64)[sources][:, None]
    per_token = (1 - lam) * -log_p + lam * (1 - log_p.exp())
    want = (per_token * mask).sum() / mask.sum()
    assert step_logs(trainer)[1]["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_resume_reproduces_every_source_schedule(tmp_path, shipped_tokenizer):
    dataset = mixture(16)
    run = dict(max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=4)
    uninterrupted = make(tmp_path / "a", dataset, shipped_tokenizer, **run)
    uninterrupted.train()
    checkpoint = os.path.join(uninterrupted.args.output_dir, "checkpoint-3")
    resumed = make(tmp_path / "b", dataset, shipped_tokenizer, **run)
    resumed.train(resume_from_checkpoint=checkpoint)
    a, b = step_logs(uninterrupted), step_logs(resumed)
    keys = [key for key in a[4] if key.startswith(("objective_lambda", "mean_token_prob", "schedule_signal_ema", "loss"))]
    assert {"objective_lambda/add", "objective_lambda/rev"} <= set(keys)
    for step in (4, 5, 6):
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6), (step, key)
    assert resumed.extension.lambdas.state_dict() == uninterrupted.extension.lambdas.state_dict()


def test_a_checkpoint_without_per_source_state_is_refused(tmp_path, shipped_tokenizer):
    dataset = mixture(8)
    plain = make(tmp_path / "a", dataset, shipped_tokenizer, schedule_per_source=False, max_steps=2,
                 save_strategy="steps", save_steps=2)  # fmt: skip
    plain.train()
    checkpoint = os.path.join(plain.args.output_dir, "checkpoint-2")
    resumed = make(tmp_path / "b", dataset, shipped_tokenizer, max_steps=4)
    with pytest.raises(CheckpointError, match="no per-source schedule state.*--schedule_reset_on_resume"):
        resumed.train(resume_from_checkpoint=checkpoint)


def test_a_source_without_tokens_keeps_its_statistic_and_is_said_once(tmp_path, shipped_tokenizer, caplog):
    dataset = addition_dataset(16).add_column("source", ["add"] * 16)
    trainer = make(tmp_path, dataset, shipped_tokenizer, max_steps=3, schedule_sources=["add", "later"])
    with caplog.at_level(logging.WARNING, logger="trl_prob"):  # said by the per-source provider (trl_prob.experimental.sources)
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "source later had no target tokens" in r.getMessage()]
    assert len(said) == 1, said
    later = trainer.extension.lambdas.state_dict()["later"]
    assert (later["p_ema"] is None or math.isnan(later["p_ema"])) and later["objective_lambda"] == 0.0
    assert all("objective_lambda/later" not in entry for entry in step_logs(trainer).values())


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(objective_schedule="constant"), "schedule_per_source needs objective_schedule='adaptive'"),
        (dict(packing=True), "cannot be used with packing"),
        (dict(eval_packing=True), "cannot be used with eval_packing"),
        (dict(schedule_sources=["a", "a"]), "names a more than once"),
        (dict(schedule_sources=[str(i) for i in range(MAX_SOURCES + 1)]), f"at most {MAX_SOURCES}"),
        (dict(schedule_sources=["a", "b"], schedule_source_lambda="c=0"), "unknown source.*'c'.*'a', 'b'"),
        (dict(schedule_source_lambda="chat=2"), r"schedule_source_lambda\['chat'\] must be a lambda in \[0, 1\]"),
        (dict(schedule_source_lambda="chat"), "expected name=lambda pairs"),
        (dict(schedule_per_source=False, schedule_source_lambda="chat=0"), "schedule_per_source is off"),
    ],
)
def test_bad_per_source_options_are_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ExperimentalSFTConfig(**base_args(tmp_path, **{**PER_SOURCE, **overrides}))


def test_source_lambda_parses_json_and_pairs(tmp_path):
    pairs = ExperimentalSFTConfig(**base_args(tmp_path, **PER_SOURCE, schedule_source_lambda="chat=0, code=0.5"))
    as_json = ExperimentalSFTConfig(**base_args(tmp_path, **PER_SOURCE, schedule_source_lambda='{"chat": 0, "code": 0.5}'))
    assert pairs.schedule_source_lambda == as_json.schedule_source_lambda == {"chat": 0.0, "code": 0.5}


@pytest.mark.parametrize(
    "dataset, overrides, message",
    [
        (lambda: addition_dataset(8), {}, r"source in column 'source'.*columns \['prompt', 'completion'\]"),
        (lambda: mixture(4), dict(schedule_source_lambda="chat=0"), "unknown source.*'chat'.*'add', 'rev'"),
        (lambda: mixture(4), dict(schedule_sources=["add"]), r"row 1: source 'rev'.*not one of the run's sources"),
        (lambda: addition_dataset(4).add_column("source", ["a", None, "a", "a"]), {}, "row 1: source None"),
        (lambda: addition_dataset(MAX_SOURCES + 1, noise=0.0).add_column("source", [str(i) for i in range(MAX_SOURCES + 1)]),
         {}, f"{MAX_SOURCES + 1} distinct sources; at most {MAX_SOURCES}"),
    ],
    ids=["no-column", "unknown-source-lambda", "unlisted-source", "missing-name", "too-many"],
)
def test_bad_source_data_is_one_clear_error_before_training(tmp_path, shipped_tokenizer, dataset, overrides, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, dataset(), shipped_tokenizer, **overrides)


def test_pinned_source_lambda_is_held(tmp_path, shipped_tokenizer):
    trainer = make(tmp_path, mixture(8), shipped_tokenizer, max_steps=2, schedule_source_lambda="rev=0")
    trainer.train()
    for entry in step_logs(trainer).values():
        assert entry["objective_lambda/rev"] == 0.0
        assert 0.0 < entry["objective_lambda/add"] < 1.0


def test_padding_free_batches_carry_sources(tmp_path, shipped_tokenizer):
    """Padding-free flattens a batch into one row: each token must take its own sample's source lambda, and count
    toward its own sample's source. (On CPU, without FlashAttention, padding-free attention mixes the sequences, so
    the wiring is checked here, not the numbers.)"""
    trainer = make(tmp_path, mixture(8), shipped_tokenizer, max_steps=1, padding_free=True, max_length=None)
    examples = [trainer.train_dataset[i] for i in range(6)]
    batch = trainer.data_collator(examples)
    assert batch["input_ids"].shape[0] == 1 and batch["cu_seq_lens_q"] is not None
    mask = batch["labels"][:, 1:] != -100
    index = sample_index(batch, mask)
    lambdas = torch.tensor([0.25, 0.75])
    per_token = token_lambdas(lambdas, batch[SOURCE_ID], index)

    # Independently: which example each flattened position came from, from the examples' own lengths.
    owner = torch.cat([torch.full((len(ex["input_ids"]),), i) for i, ex in enumerate(examples)])[1:]
    want = torch.tensor([lambdas[examples[i][SOURCE_ID]] for i in owner.tolist()])
    torch.testing.assert_close(per_token[0][mask[0]], want[mask[0]])

    log_p = torch.where(mask, -torch.rand(mask.shape), 0.0)
    _, stats = objective_loss(HeadTokens(log_p, mask), get_objective("p"), per_token, sample_index=index,
                              num_samples=num_samples(batch),
                              group=lambda rows: SourceStats.from_rows(rows, batch[SOURCE_ID], 2))  # fmt: skip
    for source in (0, 1):
        targets = sum(sum(label != -100 for label in ex["labels"][1:]) for ex in examples if ex[SOURCE_ID] == source)
        assert stats[source].num_tokens == targets > 0
    trainer.train()  # and a padding-free step runs with both sources
    assert {"objective_lambda/add", "objective_lambda/rev"} <= set(step_logs(trainer)[1])


def test_warm_start_measures_every_source_of_a_concatenated_mixture(tmp_path, shipped_tokenizer):
    """TRL concatenates a mixture's entries: the first rows are all one source. The warm start takes each source's
    share instead, so every source starts from its own measurement."""
    add = addition_dataset(24, noise=0.0).add_column("source", ["add"] * 24)
    rev = reversed_answers(addition_dataset(8, noise=0.0, seed=1)).add_column("source", ["rev"] * 8)
    trainer = make(tmp_path, concatenate_datasets([add, rev]), shipped_tokenizer, max_steps=1,
                   schedule_warm_start_samples=8)  # fmt: skip
    measured = trainer._first_rows(8)[SOURCE_ID]
    assert sorted(measured) == [0] * 6 + [1] * 2
    trainer.train()
    assert all(state["warm_started"] for state in trainer.extension.lambdas.state_dict().values())


# ----------------------------------------------------------------------------------- the default signal's input


def test_a_top1_signal_without_is_top1_is_refused_before_step_1(tmp_path, shipped_tokenizer):
    """token_top1 (the default) reads TRL's `is_top1`; a forward that drops it would leave the signal NaN and the
    schedule at NLL for the whole run without a word. (TRL's own metric needs it too, but only inside the first step.)"""
    trainer = make(tmp_path, addition_dataset(16), shipped_tokenizer, max_steps=1, schedule_per_source=False,
                   schedule_signal="token_top1")  # fmt: skip
    model = trainer.model
    forward = model.forward

    def without_top1(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        outputs.is_top1 = None
        return outputs

    model.forward = without_top1
    with pytest.raises(ValueError, match="schedule_signal='token_top1' reads .*is_top1.*--schedule_signal mean"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_source_can_follow_its_own_signal(tmp_path, shipped_tokenizer):
    """schedule_source_signal: `rev` follows geomean on geomean's ramp, `add` the run's signal; each source's
    logged signal and lambda are its own, and the probe reads each source as its schedule does."""
    from trl_prob.probe import run_probe
    from trl_prob.schedules import SIGNALS, adaptive_lambda

    trainer = make(tmp_path, mixture(8), shipped_tokenizer, max_steps=2, schedule_ramp_low=None, schedule_ramp_high=None,
                   schedule_source_signal="rev=geomean")  # fmt: skip
    schedules = dict(zip(trainer.extension.names, trainer.extension.lambdas.schedules))
    assert schedules["rev"].signal_name == "geomean" and schedules["add"].signal_name == "mean"
    assert (schedules["rev"].ramp_low, schedules["rev"].ramp_high) == (SIGNALS["geomean"].ramp_low, SIGNALS["geomean"].ramp_high)
    report = run_probe(trainer, num_samples=None, output_dir=None, progress=False)
    assert report.sources["rev"]["schedule_signal"] == "geomean"
    measured = trainer.measure_dataset(trainer.train_dataset, progress=False).groups
    rev = trainer.extension.names.index("rev")
    assert report.sources["rev"]["schedule_signal_value"] == pytest.approx(measured[rev].geometric_mean_p, rel=1e-9)
    trainer.train()
    logs = step_logs(trainer)
    assert "geomean_token_prob/rev" in logs[1] and "geomean_token_prob/add" not in logs[1]
    p_ema = schedules["rev"].p_ema
    assert schedules["rev"].value == pytest.approx(adaptive_lambda(p_ema, schedules["rev"].ramp_low, schedules["rev"].ramp_high))


@pytest.mark.parametrize(
    "value, message",
    [("rev=nope", "schedule_source_signal\\['rev'\\] = 'nope' is not a signal"),
     ("rev", "expected name=signal pairs")],
)
def test_bad_source_statistic_is_one_clear_error(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        ExperimentalSFTConfig(**base_args(tmp_path, **{**PER_SOURCE, "schedule_source_signal": value}))
