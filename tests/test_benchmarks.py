"""benchmarks/continuum.py: model selection on validation only, the verdicts, and one tiny end-to-end run."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os

import pytest
from trl_prob.experimental import ExperimentalSFTConfig  # noqa: E402  (the research knobs these tests use)

from _launch import python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def continuum():
    # Imported by name (not from a file spec): the benchmark's spawned workers re-import it by name, with the sys.path
    # multiprocessing hands them (benchmarks/ on it: pyproject.toml's pytest `pythonpath`).
    return importlib.import_module("continuum")


def _run(obj, lr, seed, val, test, base="strong", noise=0.2):
    return dict(base=base, noise=noise, objective=obj, lr=lr, seed=seed, val_acc=val, test_acc=test,
                lambda_path=[0.0, 0.5, 1.0] if obj == "adaptive" else None)


def test_learning_rate_is_chosen_on_validation_never_on_test(continuum):
    # lr 1e-3 wins on validation but loses on test: the row must report lr 1e-3 and its own test scores.
    runs = [_run("nll", 1e-3, s, val=0.6, test=t) for s, t in [(0, 0.30), (1, 0.40)]]
    runs += [_run("nll", 3e-4, s, val=0.5, test=0.9) for s in (0, 1)]
    runs += [_run("adaptive", lr, s, val=0.5, test=0.5) for lr in (1e-3, 3e-4) for s in (0, 1)]
    args = argparse.Namespace(objectives=["nll", "adaptive"], lrs=[1e-3, 3e-4], seeds=[0, 1])
    info = {("strong", 0.2): dict(probe_mean_p=0.8, base_test_acc=0.7)}
    rows, verdicts = continuum.summarise(runs, [("strong", 0.2)], args, info)
    nll = next(r for r in rows if r["objective"] == "nll")
    assert nll["lr"] == 1e-3
    assert nll["test_acc_mean"] == pytest.approx(0.35)
    assert nll["test_acc_se"] == pytest.approx(0.1 / math.sqrt(2) / math.sqrt(2))  # stdev / sqrt(n seeds)
    ada = next(r for r in rows if r["objective"] == "adaptive")
    assert ada["lambda_path_mean"] == [0.0, 0.5, 1.0]
    (v,) = verdicts
    # adaptive 0.50 vs best fixed nll 0.35: ahead of it, so within one s.e. and beating every fixed objective.
    assert v["best_fixed"] == "nll" and v["adaptive_within_1se_of_best"] and v["adaptive_beats_every_fixed"]


def test_a_learning_rate_run_with_the_first_seed_only_cannot_win(continuum):
    # Successive halving: lr 3e-3 was dropped after the first seed (no seed 1), however good that one run was.
    runs = [_run("nll", 3e-3, 0, val=0.99, test=0.99)]
    runs += [_run("nll", lr, s, val=v, test=v) for lr, v in [(1e-3, 0.5), (3e-4, 0.6)] for s in (0, 1)]
    args = argparse.Namespace(objectives=["nll"], lrs=[3e-3, 1e-3, 3e-4], seeds=[0, 1])
    info = {("strong", 0.2): dict(probe_mean_p=0.8, base_test_acc=0.7)}
    (row,), _ = continuum.summarise(runs, [("strong", 0.2)], args, info)
    assert row["lr"] == 3e-4 and row["test_acc_mean"] == pytest.approx(0.6)


def test_verdict_flags_an_adaptive_row_behind_the_best_by_more_than_one_se(continuum):
    runs = [_run("p", 1e-3, s, val=0.9, test=t) for s, t in [(0, 0.80), (1, 0.82)]]
    runs += [_run("nll", 1e-3, s, val=0.5, test=t) for s, t in [(0, 0.40), (1, 0.42)]]
    runs += [_run("adaptive", 1e-3, s, val=0.7, test=t) for s, t in [(0, 0.60), (1, 0.62)]]
    args = argparse.Namespace(objectives=["nll", "p", "adaptive"], lrs=[1e-3], seeds=[0, 1])
    info = {("strong", 0.2): dict(probe_mean_p=0.8, base_test_acc=0.7)}
    _, (v,) = continuum.summarise(runs, [("strong", 0.2)], args, info)
    assert v["best_fixed"] == "p" and v["worst_fixed"] == "nll"
    assert not v["adaptive_within_1se_of_best"]
    assert v["adaptive_ahead_of_worst"]
    assert not v["adaptive_beats_every_fixed"]


@pytest.mark.timeout(600)
def test_tiny_end_to_end_run_writes_table_json_and_plot(continuum, tmp_path):
    out = tmp_path / "continuum.json"
    continuum.main([
        "--bases", "none", "--objectives", "nll", "adaptive", "--lrs", "1e-3", "3e-3", "--seeds", "0", "1",
        "--finalists", "1", "--noise", "0.2", "--adaptive-option", "schedule_ema_decay=0.5",
        "--n-train", "64", "--n-val", "16", "--n-test", "16", "--batch-size", "16", "--epochs", "1",
        "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ])
    result = json.loads(out.read_text())
    assert {r["objective"] for r in result["summary"]} == {"nll", "adaptive"}
    # Successive halving: 2 objectives x 2 learning rates with seed 0, then seed 1 for 1 finalist each.
    assert len(result["runs"]) == 6 and all(r["steps"] == 4 for r in result["runs"])
    for obj in ("nll", "adaptive"):
        seeds_by_lr = {}
        for r in result["runs"]:
            if r["objective"] == obj:
                seeds_by_lr.setdefault(r["lr"], []).append(r["seed"])
        assert sorted(sorted(v) for v in seeds_by_lr.values()) == [[0], [0, 1]]
        (row,) = [r for r in result["summary"] if r["objective"] == obj]
        assert sorted(seeds_by_lr[row["lr"]]) == [0, 1]
    row = next(r for r in result["summary"] if r["objective"] == "adaptive")
    # A random init puts its probe far below schedule_ramp_low: the adaptive schedule must start at pure NLL.
    assert row["probe_mean_p"] < 0.3
    assert row["lambda_path_mean"][0] == 0.0
    assert result["setup"]["adaptive_option"] == {"schedule_ema_decay": 0.5}
    assert (tmp_path / "continuum.png").stat().st_size > 0
    assert "adaptive" in result["table"]


# The cost benchmarks re-execute themselves (glibc reads MALLOC_MMAP_THRESHOLD_ at start-up only), so they run as
# subprocesses here, at toy sizes: these tests check that they still drive trl-prob's current code (a stand-in that
# drifted from the mixin once broke both), not their numbers.
def _run_script(args, tmp_path, timeout=300):
    out = tmp_path / "result.json"
    proc = python(*args, "--out", out, timeout=timeout, threads=None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_loss_memory_benchmark_runs_every_case_kind(tmp_path):
    result = _run_script([
        "benchmarks/loss_memory.py", "--config", "512x32x64", "--case", "trl:nll", "--case", "prob:p",
        "--case", "prob:top_p:0.2", "--case", "prob:power:10+adaptive", "--case", "paper:p", "--repeats", "1",
        "--warmup", "0", "--loss-reps", "2", "--no-plot", "--flush-denormal",
    ], tmp_path)
    assert result["meta"]["flush_denormal"] is True
    text = json.dumps(result)
    for case in ("trl:nll", "prob:p", "prob:top_p:0.2", "prob:power:10+adaptive", "paper:p"):
        assert case in text


def test_train_step_benchmark_runs_with_hot_path(tmp_path):
    result = _run_script([
        "benchmarks/train_step.py", "--vocab", "256", "--hidden", "32", "--layers", "1", "--seq-len", "16",
        "--batch-size", "2", "--grad-accum", "1", "--steps", "2", "--rounds", "1", "--warm-start-samples", "2",
        "--case", "trl:nll", "--case", "prob:top_p:0.2", "--case", "prob:power:10+adaptive",
        "--hot-path", "--hot-path-reps", "2",
    ], tmp_path)
    assert {"meta", "cases", "hot_path"} <= set(result)
    assert "prob:top_p:0.2" in json.dumps(result["hot_path"])


def test_an_unknown_adaptive_option_is_refused_before_anything_runs(continuum, tmp_path, capsys):
    with pytest.raises(SystemExit):
        continuum.main(["--adaptive-option", "schedule_statistc=median", "--cache-dir", str(tmp_path)])
    assert "schedule_statistc=median" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# benchmarks/sources.py: per-source schedules on a two-source mixture.
@pytest.fixture(scope="module")
def sources_bench():
    return importlib.import_module("sources")  # benchmarks/sources.py (benchmarks/ on sys.path: pyproject.toml)


def _cell(mean, se):
    return dict(mean=mean, se=se, accs=[])


def test_sources_verdict_matches_each_source_within_one_combined_se(sources_bench):
    table = {
        "nll": dict(add=_cell(0.60, 0.02), new=_cell(0.50, 0.02)),
        "p": dict(add=_cell(0.80, 0.02), new=_cell(0.10, 0.02)),
        "per_source": dict(add=_cell(0.78, 0.02), new=_cell(0.45, 0.03)),  # gaps 0.02 and 0.05 vs 1 s.e. 0.028, 0.036
        "adaptive": dict(add=_cell(0.79, 0.01), new=_cell(0.20, 0.01)),
    }
    v = sources_bench.verdict(table)
    assert v["best_fixed"] == {"add": "p", "new": "nll"}
    assert v["setup_separates"]
    assert not v["candidates"]["nll"]["meets_goal"] and not v["candidates"]["p"]["meets_goal"]
    per = v["candidates"]["per_source"]
    assert per["sources"]["add"]["matches"] and not per["sources"]["new"]["matches"] and not per["meets_goal"]
    table["per_source"]["new"] = _cell(0.47, 0.03)  # gap 0.03 <= 0.036
    assert sources_bench.verdict(table)["candidates"]["per_source"]["meets_goal"]


@pytest.mark.timeout(300)
def test_sources_tiny_end_to_end_has_every_candidate_per_source_and_resumes(sources_bench, tmp_path):
    from addition import random_tiny_llama

    base = tmp_path / "base"
    random_tiny_llama(seed=0).save_pretrained(base)
    out = tmp_path / "sources.json"
    argv = ["--base", str(base), "--seeds", "1", "--n-train", "24", "--n-test", "8", "--batch-size", "16",
            "--epochs", "1", "--workers", "1", "--out", str(out)]
    sources_bench.main(argv)
    result = json.loads(out.read_text())
    assert set(result["table"]) == set(sources_bench.CANDIDATES)
    for name, row in result["table"].items():
        for source in ("add", "new"):
            assert 0.0 <= row[source]["mean"] <= 1.0 and len(row[source]["accs"]) == 1
        # Fixed objectives have no lambda; every adaptive candidate logs one per source (global: the same for both).
        assert ("lambda_first_mid_last" in row) == (name not in ("nll", "p"))
    lam = result["table"]["adaptive"]["lambda_first_mid_last"]
    assert lam["add"] == lam["new"]
    assert set(result["verdict"]["candidates"]) == set(sources_bench.CANDIDATES)
    runs = (tmp_path / "sources.json.runs.jsonl").read_text().splitlines()
    assert len(runs) == len(sources_bench.CANDIDATES) and all(json.loads(r)["steps"] == 3 for r in runs)
    assert (tmp_path / "sources.png").stat().st_size > 0
    sources_bench.main(argv)  # everything is in the runs file: nothing runs again
    assert len((tmp_path / "sources.json.runs.jsonl").read_text().splitlines()) == len(runs)


# benchmarks/confidence.py: issue 21's candidates and the rule that chooses `--objective auto`.
@pytest.fixture(scope="module")
def confidence_bench():
    return importlib.import_module("confidence")  # benchmarks/confidence.py (benchmarks/ on sys.path: pyproject.toml)


def test_confidence_candidates_are_valid_configs(confidence_bench, tmp_path):
    from trl_prob import ProbSFTConfig

    c = confidence_bench
    assert set(c.ELIGIBLE) | set(c.HINDSIGHT) == set(c.CANDIDATES) and not set(c.ELIGIBLE) & set(c.HINDSIGHT)
    assert c.DEFAULT in c.ELIGIBLE and set(c.FIXED) <= set(c.ELIGIBLE)
    for name, options in c.CANDIDATES.items():
        config = ExperimentalSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)
        assert config.objective == options["objective"], name
        if name in c.HINDSIGHT:  # the last ramp reaches 1 at the end of the run
            assert config.schedule_warmup_start + config.schedule_warmup_ratio <= 1.0


def _acc(cells):
    """{row key: {candidate: {seed: accuracy}}} from {row key: {candidate: [accuracy per seed]}}."""
    return {k: {c: dict(enumerate(xs)) for c, xs in row.items()} for k, row in cells.items()}


def test_confidence_rule_picks_a_candidate_only_if_it_is_behind_less_than_the_default(confidence_bench):
    c = confidence_bench
    kw = dict(eligible=["nll", "p", "D", "X"], fixed=["nll", "p"], default="D")
    r1, r2 = ("add2", "strong", 0.2, "short"), ("mixture", "new")
    acc = _acc({
        r1: dict(nll=[0.60, 0.62, 0.61], p=[0.90, 0.91, 0.89], D=[0.90, 0.91, 0.89], X=[0.80, 0.81, 0.79]),
        r2: dict(nll=[0.50, 0.52, 0.51], p=[0.10, 0.11, 0.09], D=[0.10, 0.11, 0.09], X=[0.70, 0.71, 0.69]),
    })
    table = c.build_table(acc, [r1, r2], eligible=kw["eligible"], extra=[])
    assert all(row["in_rule"] and row["seeds"] == [0, 1, 2] for row in table)
    v = c.apply_rule(table, **kw)
    # X is behind p on r1 and ahead of nll on r2; the default D (= p) is behind nll on r2: 1 row each, X ahead in more.
    assert v["per"]["X"]["behind"] == ["add2/strong/20%/short"] and v["per"]["X"]["ahead"] == ["mixture/new"]
    assert v["per"]["D"]["behind"] == ["mixture/new"] and not v["per"]["D"]["ahead"]
    assert v["first"] == "X" and v["auto"] == "X"
    assert not v["goal_met"]  # X is behind somewhere: the goal must fail
    assert table[0]["best_fixed"] == "p" and table[1]["best_fixed"] == "nll"
    # X within one s.e. on r1 (noisy seeds): behind nowhere, ahead on r2: the goal is met.
    acc[r1]["X"] = {0: 0.95, 1: 0.80, 2: 0.88}
    v = c.apply_rule(c.build_table(acc, [r1, r2], eligible=kw["eligible"], extra=[]), **kw)
    assert v["auto"] == "X" and v["goal_met"] and not v["per"]["X"]["behind"]
    # X no better than the default (behind in as many rows, ahead in none): auto stays the default.
    acc[r2]["X"] = {0: 0.10, 1: 0.11, 2: 0.09}
    acc[r1]["X"] = {0: 0.90, 1: 0.91, 2: 0.89}
    v = c.apply_rule(c.build_table(acc, [r1, r2], eligible=kw["eligible"], extra=[]), **kw)
    assert v["auto"] == "D" and not v["goal_met"]


def test_confidence_rows_need_two_seeds_common_to_every_eligible_candidate(confidence_bench):
    c = confidence_bench
    key = ("add2", "none", 0.2, "long")
    acc = _acc({key: dict(nll=[0.5, 0.6, 0.7], p=[0.0, 0.0, 0.0], D=[0.4], X=[0.3, 0.4])})
    acc[key]["linear@0.50"] = {0: 0.8, 1: 0.9}
    (row,) = c.build_table(acc, [key], eligible=["nll", "p", "D", "X"], extra=["linear@0.50"])
    assert row["seeds"] == [0] and not row["in_rule"]
    assert row["results"]["nll"]["n"] == 1  # cells over the common seeds only
    assert row["results"]["linear@0.50"]["n"] == 2  # a hindsight bound over its own seeds
    v = c.apply_rule([row], eligible=["nll", "p", "D", "X"], fixed=["nll", "p"], default="D")
    assert v["rows_used"] == [] and v["auto"] == "D"
    d = c.paired(acc, key, "X", "nll")
    assert d["n"] == 2 and d["mean"] == pytest.approx(-0.2) and d["b_ahead"] == 2


def test_confidence_runs_of_another_base_are_set_aside(confidence_bench, tmp_path):
    """Toy bases are pretrained again on each machine and can come out at another strength; a recorded run counts for
    the base built here only if its weights hash matches (or, recorded before hashing, if the base measured the same)."""
    c = confidence_bench
    (tmp_path / "model.safetensors").write_bytes(b"base")
    sha = c.weights_sha256(str(tmp_path))
    assert c.same_base({"base_sha256": sha}, sha, legacy_ok=False)
    assert not c.same_base({"base_sha256": "0" * 16}, sha, legacy_ok=True)
    assert c.same_base({}, sha, legacy_ok=True) and not c.same_base({}, sha, legacy_ok=False)
