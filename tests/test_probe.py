"""The probe: exact against full logits, high on a trained model, low on a random one, same on 1 and 2 processes,
clear errors on bad input, and a JSON report holding everything the table shows."""

from __future__ import annotations

import json
import os
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from _launch import accelerate_launch  # noqa: E402
from addition import build_tokenizer, make_addition_examples, random_tiny_llama  # noqa: E402
from trl_prob.experimental import ExperimentalSFTConfig  # noqa: E402  (the research knobs these tests use)
from trl_prob import ProbSFTConfig, ProbSFTTrainer  # noqa: E402
from trl_prob.embedded import default_dataset_path, default_model_path  # noqa: E402
from trl_prob.measure import Measurement, measure, sample_index  # noqa: E402
from trl_prob.probe import (  # noqa: E402
    FORMAT_EXACT,
    PROBE_HISTOGRAM_PNG,
    PROBE_JSON,
    ProbeInputError,
    ProbeReport,
    check_probe_inputs,
    describe_position,
    place_on_continuum,
    recommend,
    run_probe,
)
from trl_prob.stats import HISTOGRAM_BINS, TokenProbStats  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------- helpers


def addition(n=48, noise=0.0, seed=0, format="prompt_completion") -> Dataset:
    rows = make_addition_examples(n, noise=noise, seed=seed, format=format)
    return Dataset.from_list([{k: v for k, v in row.items() if k not in ("answer", "noisy")} for row in rows])


def make_trainer(tmp_path, model=None, dataset=None, tokenizer=None, **overrides) -> ProbSFTTrainer:
    args = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    args.update(overrides)
    return ProbSFTTrainer(
        model=model if model is not None else random_tiny_llama(seed=0),
        args=ExperimentalSFTConfig(**args),
        train_dataset=dataset if dataset is not None else addition(),
        processing_class=tokenizer if tokenizer is not None else build_tokenizer(),
    )


@pytest.fixture(scope="module")
def trained_model():
    return AutoModelForCausalLM.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def trained_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def shipped_train():
    return load_dataset(default_dataset_path())["train"]


def full_logits_reference(trainer: ProbSFTTrainer) -> torch.Tensor:
    """p of every target token, from full logits (log_softmax + gather) on TRL's own batches and labels."""
    model = trainer.model
    model.eval()
    probs = []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader(trainer.train_dataset):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            log_p = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
            probs.append(log_p[mask].exp())
    return torch.cat(probs)


# --------------------------------------------------------------------------------------------- exact values


def test_probe_matches_full_logits(tmp_path, trained_model, trained_tokenizer):
    # The shipped model spreads p over [0, 1], so mean, median and share are all informative.
    data = addition(40, noise=0.3, seed=3)
    trainer = make_trainer(tmp_path, trained_model, data, trained_tokenizer, per_device_eval_batch_size=7)
    report = run_probe(trainer, num_samples=None, output_dir=None, progress=False)
    p = full_logits_reference(trainer)

    # TRL's masks: the completion and its EOS are the targets, the prompt is not.
    assert report.num_tokens == p.numel() == sum(len(c) + 1 for c in data["completion"])
    assert report.num_samples == len(data)
    assert report.mean_p == pytest.approx(p.mean().item(), abs=1e-5)
    assert report.nll == pytest.approx(-p.log().mean().item(), abs=1e-4)
    assert report.share_confident == pytest.approx((p > 0.55).double().mean().item(), abs=1.01 / p.numel())
    assert abs(report.median_p - torch.quantile(p, 0.5).item()) <= 1.0 / HISTOGRAM_BINS + 1e-6
    assert sum(report.histogram["token_counts"]) == p.numel()


def test_measure_token_probs_restores_training_mode(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.model.train()
    stats = trainer.measure_token_probs(progress=False)
    assert trainer.model.training
    assert stats.num_tokens > 0


def test_sample_index_of_a_padding_free_batch():
    # Three samples of 3, 2 and 4 tokens flattened into one row; log-prob position j predicts token j + 1.
    batch = {"input_ids": torch.zeros(1, 9, dtype=torch.long), "cu_seq_lens_q": torch.tensor([0, 3, 5, 9])}
    index = sample_index(batch, torch.ones(1, 8, dtype=torch.bool))
    assert index.tolist() == [[0, 0, 1, 1, 2, 2, 2, 2]]


# ------------------------------------------------------------------------------------- trained vs random


def test_trained_model_probes_high_and_random_model_low(tmp_path, trained_model, trained_tokenizer, shipped_train):
    trained = run_probe(
        make_trainer(tmp_path / "trained", trained_model, shipped_train, trained_tokenizer),
        num_samples=128,
        output_dir=None,
        batch_size=64,
        progress=False,
    )
    random = run_probe(
        make_trainer(tmp_path / "random", random_tiny_llama(seed=1), shipped_train, trained_tokenizer),
        num_samples=128,
        output_dir=None,
        batch_size=64,
        progress=False,
    )
    assert trained.num_samples == random.num_samples == 128
    assert trained.mean_p > 0.5 > 0.1 > random.mean_p
    assert trained.share_confident > 0.5 > random.share_confident
    assert trained.continuum in ("model-intermediate", "model-strong")
    assert trained.recommended_objective == "p"
    assert random.continuum == "model-weak"
    assert random.recommended_flags == "--objective nll --objective_schedule none"
    assert trained.nll < random.nll


# ----------------------------------------------------------------------------------------- the continuum


@pytest.mark.parametrize(
    ("mean_p", "continuum", "objective", "schedule"),
    [
        (0.03, "model-weak", "nll", "none"),
        (0.20, "model-weak", "p", "adaptive"),
        (0.45, "model-intermediate", "p", "adaptive"),
        (0.62, "model-strong", "p", "none"),
        (0.79, "model-strong", "p", "none"),
    ],
)
def test_continuum_and_recommendation(mean_p, continuum, objective, schedule):
    assert place_on_continuum(mean_p) == continuum
    got_objective, got_schedule, reason = recommend(mean_p)
    assert (got_objective, got_schedule) == (objective, schedule)
    assert reason


def test_a_model_that_completes_almost_no_row_is_treated_as_weak_whatever_its_mean_p():
    # SmolLM2 on the quickstart's equations: mean p 0.61, 1.8% of rows exact; the paper's rule alone says p
    assert recommend(0.61)[:2] == ("p", "none")
    objective, schedule, reason = recommend(0.61, exact=0.018)
    assert (objective, schedule) == ("nll", "none") and "1.8%" in reason
    assert recommend(0.45, exact=0.0)[:2] == ("nll", "none")
    assert recommend(0.61, exact=FORMAT_EXACT)[:2] == ("p", "none")  # at the cut-off the paper's rule applies
    assert recommend(0.61, exact=float("nan"))[:2] == ("p", "none")  # not measured: the paper's rule


def test_recommendation_keeps_a_prior_leaning_target_and_the_configured_ramp():
    assert recommend(0.45, "power:10")[:2] == ("power:10", "adaptive")
    assert recommend(0.45, "bottom_p:0.5")[0] == "p"  # prior-averse targets are not a recommendation
    assert place_on_continuum(0.45, ramp_low=0.2, ramp_high=0.4) == "model-strong"


@pytest.mark.parametrize(
    ("mean_p", "words"),
    [(0.005, "below"), (0.04, "inside the paper's weak"), (0.3, "between"), (0.55, "inside the paper's intermediate"),
     (0.78, "inside the paper's strong"), (0.95, "above")],
)
def test_position_against_the_papers_bands(mean_p, words):
    assert words in describe_position(mean_p)


# ---------------------------------------------------------------------------------------- report and files


def test_json_holds_every_field_the_table_shows(tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    report = run_probe(trainer, num_samples=20, output_dir=str(tmp_path / "probe"))
    printed = capsys.readouterr().out
    with open(tmp_path / "probe" / PROBE_JSON) as f:
        saved = json.load(f)
    with open(tmp_path / "probe" / PROBE_HISTOGRAM_PNG, "rb") as f:
        assert f.read(8) == PNG_MAGIC

    rows = [row for row in report.table_rows() if row[0]]
    for label, key, value in rows:
        assert key in saved, f"table row {label!r} has no {key!r} in {PROBE_JSON}"
        assert label in printed
    for key in ("num_samples", "num_tokens", "mean_p", "median_p", "share_confident", "nll"):
        assert saved[key] == pytest.approx(getattr(report, key))
    assert saved["num_samples"] == 20
    assert saved["recommended_flags"] in printed
    assert saved["continuum"] in printed
    assert sum(saved["histogram"]["token_counts"]) == saved["num_tokens"]
    assert len(saved["histogram"]["bin_edges"]) == len(saved["histogram"]["token_counts"]) + 1
    assert sum(saved["histogram_fine"]["token_counts"]) == saved["num_tokens"]
    assert "(1 - noise)" in saved["note"]
    assert ProbeReport(**saved).format_table() == report.format_table()


def test_report_of_no_tokens_writes_valid_json(tmp_path):
    empty = Measurement(TokenProbStats.zeros(), num_samples=0, num_samples_without_targets=0)
    report = ProbeReport.from_measurement(empty)
    json_path, _ = report.save(str(tmp_path))
    with open(json_path) as f:
        assert json.load(f)["mean_p"] is None  # NaN is not JSON


def test_batch_size_overrides_the_eval_batch_size_and_is_restored(tmp_path):
    trainer = make_trainer(tmp_path, per_device_eval_batch_size=8)
    seen = []
    original = trainer.get_eval_dataloader

    def spy(dataset):
        loader = original(dataset)
        seen.append(loader.total_batch_size)
        return loader

    trainer.get_eval_dataloader = spy
    small = run_probe(trainer, num_samples=None, output_dir=None, batch_size=5, progress=False)
    default = run_probe(trainer, num_samples=None, output_dir=None, progress=False)
    assert seen == [5, 8]
    assert trainer.args.per_device_eval_batch_size == 8
    assert small.num_tokens == default.num_tokens
    assert small.mean_p == pytest.approx(default.mean_p, abs=1e-6)


# ------------------------------------------------------------------------------------------------- errors


def test_empty_dataset_is_named(tmp_path):
    with pytest.raises(ProbeInputError, match="empty"):
        check_probe_inputs(addition().select([]), build_tokenizer())
    with pytest.raises(ProbeInputError, match=">= 1"):
        run_probe(make_trainer(tmp_path), num_samples=0, output_dir=None)


def test_conversational_data_without_chat_template_is_named():
    tokenizer = build_tokenizer()
    conversational = addition(format="conversational")
    check_probe_inputs(conversational, tokenizer)  # has a template: fine
    tokenizer.chat_template = None
    with pytest.raises(ProbeInputError, match="conversational.*no chat template.*--chat_template_path"):
        check_probe_inputs(conversational, tokenizer)
    with pytest.raises(ProbeInputError, match="no chat template"):
        check_probe_inputs(addition(format="messages"), tokenizer)
    check_probe_inputs(addition(), tokenizer)  # plain strings need no template
    check_probe_inputs(conversational, tokenizer, ExperimentalSFTConfig("out", use_cpu=True, chat_template_path="template.jinja"))


def test_truncation_that_leaves_no_target_is_counted(tmp_path):
    raw = addition(24)
    # "<bos>37+45=" alone is longer than 4 tokens: TRL drops every sample.
    trainer = make_trainer(tmp_path, dataset=raw, max_length=4)
    with pytest.raises(ProbeInputError, match=r"All 24 samples .*max_length=4"):
        run_probe(trainer, num_samples=None, output_dir=None, source_dataset=raw)
    with pytest.raises(ProbeInputError, match=r"empty.*max_length=4"):
        run_probe(trainer, num_samples=None, output_dir=None)


def test_some_samples_dropped_by_truncation_are_reported(tmp_path):
    # Prompts "a+b=" of 4 to 6 characters: with max_length 7 only the shortest keep a target token.
    raw = addition(40)
    trainer = make_trainer(tmp_path, dataset=raw, max_length=7)
    kept = len(trainer.train_dataset)
    assert 0 < kept < len(raw)
    report = run_probe(trainer, num_samples=None, output_dir=str(tmp_path / "probe"), source_dataset=raw, progress=False)
    assert report.num_samples_dropped == len(raw) - kept
    assert report.num_samples == kept
    assert "max_length=7" in report.format_table()


def _pretokenized(rows_with_targets: int, rows_without: int) -> Dataset:
    ids = [1, 10, 11, 12, 2]
    rows = [{"input_ids": ids, "labels": [-100, -100, 11, 12, 2]}] * rows_with_targets
    rows += [{"input_ids": ids, "labels": [-100] * len(ids)}] * rows_without
    return Dataset.from_list(rows)


def test_samples_without_targets_are_counted_and_all_of_them_is_an_error(tmp_path):
    skip = {"skip_prepare_dataset": True}
    trainer = make_trainer(tmp_path, dataset=_pretokenized(5, 3), dataset_kwargs=skip, max_length=16)
    report = run_probe(trainer, num_samples=None, output_dir=None, progress=False)
    assert (report.num_samples, report.num_samples_without_targets, report.num_tokens) == (8, 3, 15)
    assert "samples without targets" in report.format_table()

    trainer = make_trainer(tmp_path, dataset=_pretokenized(0, 4), dataset_kwargs=skip, max_length=16)
    with pytest.raises(ProbeInputError, match=r"None of the 4 probed samples .*max_length=16.*-100"):
        run_probe(trainer, num_samples=None, output_dir=None, progress=False)


def test_measure_on_plain_batches_counts_samples(tmp_path):
    trainer = make_trainer(tmp_path)
    batches = list(trainer.get_eval_dataloader(trainer.train_dataset))
    result = measure(trainer.model, iter(batches), progress=False)
    assert result.num_samples == len(trainer.train_dataset)
    assert result.num_samples_without_targets == 0


# ------------------------------------------------------------------------------------ 1 vs 2 processes

DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_prob import ProbSFTConfig, ProbSFTTrainer
    from trl_prob.embedded import default_dataset_path, default_model_path
    from trl_prob.probe import run_probe

    out, num_samples = sys.argv[1], int(sys.argv[2])
    path = default_model_path()
    args = ProbSFTConfig(output_dir=os.path.join(os.path.dirname(out), "run"), use_cpu=True, report_to="none",
                         per_device_eval_batch_size=4, disable_tqdm=True, save_strategy="no", seed=0)
    trainer = ProbSFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args,
                             train_dataset=load_dataset(default_dataset_path())["train"],
                             processing_class=AutoTokenizer.from_pretrained(path))
    report = run_probe(trainer, num_samples=num_samples, output_dir=None, progress=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(report.to_dict(), f)
    if torch.distributed.is_initialized():
        # A clean shutdown: without it gloo sometimes hangs at interpreter exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """
)


def _run_two_processes(tmp_path, num_samples: int) -> dict:
    script = tmp_path / "probe_script.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    out = tmp_path / "report"
    # accelerate 1.15 has no --use_cpu: --multi_gpu launches torchrun, and the config's use_cpu picks gloo.
    result = accelerate_launch("--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no",
                               "--dynamo_backend", "no", "--main_process_port", 0, script, out, num_samples,
                               timeout=120, cwd=None, fail_on_timeout=False)  # fmt: skip
    # a timeout: the known gloo hang at exit, the results were written before it
    failure = "timed out" if result is None else result.returncode != 0 and f"exit {result.returncode}:\n{result.stderr[-4000:]}"
    reports = [tmp_path / f"{out.name}.rank{rank}" for rank in range(2)]
    if not all(r.exists() for r in reports):
        pytest.fail(f"2-process probe wrote no report ({failure})")
    results = [json.loads(r.read_text()) for r in reports]
    assert results[0] == results[1], "ranks disagree"
    return results[0]


def test_one_and_two_processes_agree(tmp_path, trained_model, trained_tokenizer, shipped_train):
    # 37 samples with a per-device batch of 4: the last round is padded with repeats, which must not count.
    trainer = make_trainer(tmp_path, trained_model, shipped_train, trained_tokenizer, per_device_eval_batch_size=4)
    single = run_probe(trainer, num_samples=37, output_dir=None, progress=False).to_dict()
    double = _run_two_processes(tmp_path, num_samples=37)
    assert single["num_samples"] == double["num_samples"] == 37
    assert single["num_tokens"] == double["num_tokens"]
    assert single["histogram_fine"] == double["histogram_fine"]
    for key in ("mean_p", "median_p", "share_confident", "nll"):
        assert double[key] == pytest.approx(single[key], abs=1e-5), key
    assert double["recommended_flags"] == single["recommended_flags"]


# ------------------------------------------------------------------------------------ the schedule's own signal


def test_recommendation_reads_the_schedules_signal():
    # mean p alone says "confident"; the sequence signal on its own ramp says the model is still weak
    assert recommend(0.7)[1] == "none"
    objective, schedule, reason = recommend(0.7, "p", 0.2, 0.5, signal="sequence_top1", signal_value=0.1)
    assert (objective, schedule) == ("p", "adaptive") and "sequence_top1 signal passes 0.20" in reason
    assert recommend(0.7, "p", 0.2, 0.5, signal="sequence_top1", signal_value=0.6)[1] == "none"


@pytest.mark.parametrize("signal", ["sequence_top1", "geomean"])
def test_probe_and_warm_start_agree_on_the_signal(tmp_path, signal):
    from trl_prob.schedules import SIGNALS

    trainer = make_trainer(tmp_path, objective="p", objective_schedule="adaptive", schedule_signal=signal,
                           schedule_warm_start_samples=24)
    report = run_probe(trainer, num_samples=24, output_dir=None, progress=False)
    assert set(report.signals) == set(SIGNALS)
    assert report.schedule_signal == signal and report.schedule_signal_value == report.signals[signal]
    assert 0.0 <= report.schedule_signal_value <= 1.0  # the trainer's head reports is_top1: a real value
    trainer.begin_objective()  # what train() runs first: the warm start on the same 24 samples
    assert trainer.schedule.p_ema == pytest.approx(report.schedule_signal_value, rel=1e-9)


# ------------------------------------------------------------------------------------------------ per source


def test_per_source_probe_places_each_source_as_its_rows_alone_do(tmp_path, capsys, trained_model, trained_tokenizer):
    from datasets import concatenate_datasets

    from trl_prob.schedules import adaptive_lambda

    clean, noisy = addition(24, noise=0.0, seed=1), addition(24, noise=1.0, seed=2)  # every answer wrong
    mixed = concatenate_datasets([clean.add_column("source", ["clean"] * 24), noisy.add_column("source", ["noisy"] * 24)])
    trainer = make_trainer(tmp_path / "mixed", trained_model, mixed, trained_tokenizer, objective="p",
                           objective_schedule="adaptive", schedule_per_source=True, schedule_source_lambda="noisy=0")  # fmt: skip
    # 16 of 48 rows: the first 16 rows are all `clean`; the probe takes each source's share, 8 and 8
    report = run_probe(trainer, num_samples=16, output_dir=str(tmp_path / "probe"), progress=False)
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "probe" / PROBE_JSON).read_text())

    assert list(saved["sources"]) == ["clean", "noisy"]
    for name, rows in (("clean", clean), ("noisy", noisy)):
        alone = run_probe(make_trainer(tmp_path / name, trained_model, rows.select(range(8)), trained_tokenizer),
                          num_samples=None, output_dir=None, progress=False)  # fmt: skip
        entry = saved["sources"][name]
        assert entry["num_samples"] == 8 and entry["num_tokens"] == alone.num_tokens
        assert entry["mean_p"] == pytest.approx(alone.mean_p, abs=1e-6)
        assert entry["schedule_signal_value"] == pytest.approx(alone.schedule_signal_value, abs=1e-6)
        assert (entry["continuum"], entry["recommended_flags"]) == (alone.continuum, alone.recommended_flags)
        assert f"  {name}  " in printed and entry["recommended_flags"] in " ".join(printed.split())
    assert saved["num_samples"] == 16
    assert saved["num_tokens"] == sum(entry["num_tokens"] for entry in saved["sources"].values())
    assert (saved["sources"]["clean"]["continuum"], saved["sources"]["noisy"]["continuum"]) == ("model-strong", "model-weak")
    # step 1's lambda per source: the warm-started adaptive one, or the one schedule_source_lambda pins
    clean_entry = saved["sources"]["clean"]
    assert clean_entry["start_lambda"] == pytest.approx(adaptive_lambda(clean_entry["mean_p"], 0.30, 0.55))
    assert saved["sources"]["noisy"]["start_lambda"] == 0.0 and saved["sources"]["noisy"]["lambda_fixed"] is True
    assert ProbeReport(**saved).format_table() == report.format_table()


def test_the_note_warns_where_mean_p_overrates_a_model_that_completes_nothing():
    """SmolLM2 on the quickstart's equations: mean p 0.61 ("strong") but no row completed exactly. The note says so;
    a model that does complete rows, a weak one, or no measurement get the label-noise note alone."""
    from trl_prob.probe import NOISE_NOTE, capability_note

    warned = capability_note("model-strong", 0.0)
    assert warned.endswith(NOISE_NOTE) and "completes only 0.0%" in warned and "weak on this task" in warned
    assert "intermediate" in capability_note("model-intermediate", 0.01)
    assert capability_note("model-strong", 0.30) == NOISE_NOTE
    assert capability_note("model-weak", 0.0) == NOISE_NOTE
    assert capability_note("model-strong", float("nan")) == NOISE_NOTE
