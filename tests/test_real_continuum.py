"""benchmarks/real_continuum.py (the benchmark of record) and benchmarks/common.py: the equation scorer, the splits,
the trivial baseline, the paired statistics against a hand computation, the committed rule on a synthetic table, the
run log, and the harness end to end on a tiny random Llama (hits saved in the place's test order; a rerun skips
every run). Also benchmarks/mawps_example.py's scoring of its shipped rows."""

from __future__ import annotations

import json
import math
import os
import random
import statistics

import pytest

import common
import real_continuum as rc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ the scorer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 15.", "15"),
        ("The answer is 1,234.", "1234"),
        ("The answer is -3.5 apples", "-3.5"),
        ("the Answer is: $42", "42"),
        ("290 / 2 = 145. The answer is 145.", "145"),  # the marker wins over earlier numbers
        ("The answer is 7. Then 3 more make 10", "7"),  # ... and over later ones
        ("She has 3 apples and gets 4, so 7", "7"),  # no marker: the last number
        ("To solve this problem, we need", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert common.extract_answer(text) == expected


def test_same_number_and_format():
    assert common.same_number("43", "43") and common.same_number("43.0", "43") and common.same_number("2.50", "2.5")
    assert not common.same_number("44", "43") and not common.same_number(None, "1")
    assert not common.same_number("1.2.3", "1")
    assert [common.format_number(x) for x in (43.0, "2.50", "1,000", 0.125)] == ["43", "2.5", "1000", "0.125"]


def test_equation_rows_are_checked():
    assert common.equation_ok(dict(equation="290 / 2", answer="145"))
    assert not common.equation_ok(dict(equation="163/84", answer="2"))  # rounded in the data: left out
    assert not common.equation_ok(dict(equation="x:age; 4x", answer="5"))
    assert not common.equation_ok(dict(equation=None, answer="5"))


@pytest.mark.parametrize(
    "text, fmt, expected",
    [
        ("290 / 2", "equation", "145"),
        ("(4 + 22) - 6", "equation", "20"),
        ("( 4 + 22 - 6 ) = 18. The answer is 18.", "equation", "20"),  # the expression is scored, not its claim
        ("7 * 3.", "equation", "21"),
        ("5 / 0", "equation", "0"),  # division by zero: no value; falls back to the last number
        ("- + 4 22 6", "prefix", "20"),
        ("/ 290 2\nmore text", "prefix", "145"),
        ("+ 4", "prefix", "4"),  # malformed prefix: falls back to the last number
        ("The answer is 12.", "equation", "12"),  # not an expression: the trained answer format
        ("2 + 2", "answer", "2"),  # the answer format never computes
    ],
)
def test_predicted_value(text, fmt, expected):
    assert common.predicted_value(text, fmt) == expected


def test_prefix_round_trip_and_rejects():
    for infix in ("290 / 2", "(4 + 22) - 6", "4 + 22 * 6", "((1 + 2) * (3 - 4)) / 5"):
        assert common.evaluate_prefix(common.to_prefix(infix)) == pytest.approx(common.evaluate_infix(infix))
    assert common.to_prefix("(4 + 22) - 6") == "- + 4 22 6"
    assert common.evaluate_prefix("+ 1 2 3") is None and common.evaluate_prefix("+ 1 x") is None
    assert common.evaluate_prefix("") is None and common.evaluate_infix("5 / 0") is None
    assert common.evaluate_infix("__import__('os')") is None and common.evaluate_infix("2 ** 3") is None


def test_noisy_labels_are_wrong():
    rng = random.Random(0)
    for answer in ("0", "1", "15", "2.5"):
        for _ in range(20):
            wrong = rc.noisy_answer(answer, rng)
            assert wrong != answer and float(wrong) >= 0 and 1 <= abs(float(wrong) - float(answer)) <= 10
    for eq, answer in (("290 / 2", "145"), ("30 - 11", "19"), ("(4 + 22) - 6", "20"), ("2 * 2", "4"), ("0 + 0", "0")):
        for _ in range(10):
            wrong = rc.noisy_equation(eq, answer, rng)
            assert common.evaluate_infix(wrong) is not None and not common.same_number(
                common.predicted_value(wrong, "equation"), answer), (eq, wrong)


def test_operand_noise_writes_a_number_the_question_does_not_contain():
    problems = rc.load_problems()
    args = rc.place_args("traj_noise30_operand_long", rc.parse_args([]))
    split = rc.place_splits("traj_noise30_operand_long", args, problems)
    assert abs(len(split["noisy"]) - 0.30 * len(split["train"])) <= 3  # a row with no such operand stays clean
    clean = rc.place_splits("traj", rc.place_args("traj", rc.parse_args([])), problems)
    assert [r["prompt"] for r in split["train"]] == [r["prompt"] for r in clean["train"]]  # traj's rows, relabelled
    numbers = lambda text: {float(m.group().replace(",", "")) for m in common.NUMBER.finditer(text)}  # noqa: E731
    for i, (row, truth) in enumerate(zip(split["train"], split["train_clean"])):
        written = row["completion"][0]["content"]
        value = common.predicted_value(written, "prefix")
        if i in split["noisy"]:  # the value is wrong, and one operand is nowhere in the question
            assert not common.same_number(value, truth["answer"]), written
            assert numbers(written) - numbers(truth["question"]), (truth["question"], written)
        else:
            assert written == clean["train"][i]["completion"][0]["content"]


# ------------------------------------------------------------------------------------------------ the places


def test_splits_use_every_unused_problem_as_test_and_count_the_noise():
    problems = rc.load_problems()
    args = rc.parse_args([])
    mid, strong, noisy = (rc.place_splits(p, args, problems) for p in ("mid", "strong", "strong_noise25"))
    q = lambda rows: [r["prompt"][0]["content"] for r in rows]  # noqa: E731
    pool = rc.problem_pool(rc.EASY, problems, args.split_seed)
    # every MAWPS place tests on every problem that no MAWPS place trains or warms up on, in the fixed order
    assert [r["question"] for r in mid["test"]] == [r["question"] for r in pool[args.train_rows + args.warmup_rows :]]
    assert len(strong["test"]) == len(pool) - args.train_rows - args.warmup_rows >= rc.MIN_TEST
    assert [r["question"] for r in mid["test"]] == [r["question"] for r in strong["test"]]
    assert not set(q(strong["warm"])) & {r["question"] for r in strong["test"]}
    assert not set(q(mid["train"])) & {r["question"] for r in mid["test"]}
    assert q(mid["train"]) == q(strong["train"]) == q(noisy["train"])  # the same problems at every MAWPS place
    assert [r["question"] for r in strong["test"]] == [r["question"] for r in noisy["test"]]
    answers = {r["question"]: r["answer"] for r in pool}
    wrong = [not common.same_number(common.predicted_value(r["completion"][0]["content"], "equation"),
                                    answers[r["prompt"][0]["content"]]) for r in noisy["train"]]
    assert sum(wrong) == round(0.25 * args.train_rows) == len(noisy["noisy"])
    assert [i for i, w in enumerate(wrong) if w] == noisy["noisy"]
    weak = rc.place_splits("weak", args, problems)
    assert all(common.same_number(common.predicted_value(r["completion"][0]["content"], "prefix"),
                                  answers[r["prompt"][0]["content"]]) for r in weak["train"])
    svamp = rc.place_splits("svamp", args, problems)
    svamp_pool = rc.problem_pool(["svamp"], problems, args.split_seed)
    assert [r["question"] for r in svamp["test"]] == [r["question"] for r in svamp_pool[args.train_rows :]]
    assert len(svamp["test"]) >= rc.MIN_TEST and not set(q(svamp["train"])) & {r["question"] for r in svamp["test"]}
    with pytest.raises(ValueError, match="fewer than 400"):
        rc.place_splits("strong", rc.parse_args(["--warmup_rows", "500"]), problems)


def test_trivial_baseline_by_hand():
    rows = [dict(question="Tom has 5 apples and buys 3 more. How many?", answer="8"),  # 5 + 3 = 8: hit
            dict(question="A box of 12 has 4 broken. How many are fine?", answer="8"),  # 12 + 4 = 16: miss
            dict(question="Sam had 1,200 and got 300.", answer="1500"),  # commas dropped: hit
            dict(question="Only 7 here.", answer="7")]  # one number: no prediction
    assert rc.trivial_prediction(rows[1]["question"], "-") == "8"
    assert rc.trivial_prediction(rows[3]["question"], "+") is None
    assert rc.trivial_prediction("Share 6 among 0 friends", "/") is None
    assert rc.trivial_hits(rows, "+") == [1, 0, 1, 0]
    assert rc.trivial_hits(rows, "-") == [0, 1, 0, 0]
    assert rc.most_common_operator(["5 + 3", "12 - 4", "1 + 2 + 3", "4 * 2"]) == "+"
    assert rc.most_common_operator(["5 / 3", "4 * 2"]) == "*"  # a tie: the first of + - * /


# ------------------------------------------------------------------------------------------------ statistics


def test_mean_se_and_paired_difference_by_hand():
    m, se = common.mean_se([0.2, 0.4, 0.6])
    assert m == pytest.approx(0.4) and se == pytest.approx(0.2 / math.sqrt(3))
    assert common.mean_se([0.7]) == (0.7, 0.0)
    d = common.paired_difference([1, 0, 1, 1, 0], [0, 0, 1, 0, 1])  # differences 1 0 0 1 -1
    sd = math.sqrt(((1 - 0.2) ** 2 * 2 + 0.2**2 * 2 + (-1 - 0.2) ** 2) / 4)
    assert d["mean"] == pytest.approx(0.2) and d["se"] == pytest.approx(sd / math.sqrt(5)) and d["n"] == 5
    assert (d["a_ahead"], d["b_ahead"]) == (2, 1)
    with pytest.raises(ValueError):
        common.paired_difference([1, 0], [1])
    assert common.mean_over_seeds([[1, 0, 1], [1, 1, 0]]) == [1.0, 0.5, 0.5]
    assert [common.standing(x, 0.1) for x in (-0.2, -0.1, 0.05, 0.11)] == ["behind", "level", "level", "ahead"]
    assert common.average_ranks(dict(a=0.5, b=0.7, c=0.5, d=0.1)) == dict(b=1, a=2.5, c=2.5, d=4)


def test_place_table_pairs_per_problem_averaged_over_seeds():
    best = {0: [1, 1, 0, 0, 1, 0], 1: [1, 0, 0, 0, 1, 1]}  # per problem 1 .5 0 0 1 .5 (mean 0.5)
    other = {0: [0, 1, 0, 0, 0, 0]}  # mean 1/6
    cand = {0: [1, 1, 1, 0, 1, 1], 1: [1, 1, 1, 1, 1, 1], 2: [1, 1, 0, 0, 1, 1]}  # per problem 1 1 2/3 1/3 1 1
    t = rc.place_table({"nll": best, "p": other, "x": cand}, fixed=["nll", "p"])
    assert t["best_fixed"] == "nll"
    x = t["candidates"]["x"]
    diffs = [0, 0.5, 2 / 3, 1 / 3, 0, 0.5]
    assert x["diff"] == pytest.approx(statistics.fmean(diffs))
    assert x["diff_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(6))
    assert x["standing"] == "ahead" and x["mean"] == pytest.approx(statistics.fmean([5 / 6, 1, 4 / 6]))
    assert x["seed_sd"] == pytest.approx(statistics.stdev([5 / 6, 1, 4 / 6]))
    p = t["candidates"]["p"]
    assert p["diff"] == pytest.approx(1 / 6 - 0.5) and p["standing"] == "behind"
    assert t["candidates"]["nll"]["standing"] == "level" and t["candidates"]["nll"]["diff_se"] == 0


def _hits(acc: float, n: int = 400, shift: int = 0) -> list[int]:
    """``n`` problems, the first round(acc * n) (rotated by ``shift``) solved."""
    k = round(acc * n)
    h = [1] * k + [0] * (n - k)
    return h[shift:] + h[:shift]


def test_the_rule_on_a_synthetic_table():
    # Three places, one seed. At each, the fixed objectives solve a nested set of problems, so the paired
    # difference against the best is minus the share it misses (s.e. ~ sqrt(share / n)).
    cells = {
        "a": dict(nll=_hits(0.50), p=_hits(0.30), A=_hits(0.49), B=_hits(0.60)),
        "b": dict(nll=_hits(0.20), p=_hits(0.40), A=_hits(0.39), B=_hits(0.30)),
        "c": dict(nll=_hits(0.40), p=_hits(0.41), A=_hits(0.45), B=_hits(0.10)),
    }
    cells = {pl: {c: {0: h} for c, h in cell.items()} for pl, cell in cells.items()}
    v = rc.apply_rule(cells, ["nll", "p", "A", "B"], fixed=["nll", "p"])
    assert [v["tables"][p]["best_fixed"] for p in "abc"] == ["nll", "p", "p"]
    per = v["per"]
    # A misses 1% of the best's problems at a and b: paired s.e. = stdev of a 0/-1 vector with 1% of -1s / sqrt(400)
    se = math.sqrt(0.01 * 0.99 * 400 / 399) / 20
    assert v["tables"]["a"]["candidates"]["A"]["diff"] == pytest.approx(-0.01)
    assert v["tables"]["a"]["candidates"]["A"]["diff_se"] == pytest.approx(se)  # 0.005: 0.01 behind is "behind"
    assert per["A"]["behind"] == ["a", "b"] and per["A"]["ahead"] == ["c"]
    assert per["B"]["behind"] == ["b", "c"] and per["B"]["ahead"] == ["a"]
    assert per["nll"]["behind"] == ["b", "c"] and not per["nll"]["ahead"]  # at c 0.40 vs p's 0.41: behind
    assert per["p"]["behind"] == ["a"] and not per["p"]["ahead"]
    # No candidate is never behind, so auto is the one behind in the fewest places: p (1); then A and B (2 each, ahead
    # in 1 each: A's mean rank (3 + 2 + 1) / 3 beats B's (1 + 3 + 4) / 3), then nll (2, ahead nowhere)
    assert per["A"]["mean_rank"] == pytest.approx(2) and per["B"]["mean_rank"] == pytest.approx(8 / 3)
    assert v["never_behind"] == [] and v["auto"] == "p"
    assert v["ranking"] == ["p", "A", "B", "nll"]
    # a candidate never behind wins over one behind less often but ahead more
    cells["a"]["C"] = {0: _hits(0.50)}
    cells["b"]["C"] = {0: _hits(0.40)}
    cells["c"]["C"] = {0: _hits(0.41)}
    v = rc.apply_rule(cells, ["nll", "p", "A", "B", "C"], fixed=["nll", "p"])
    assert v["never_behind"] == ["C"] and v["auto"] == "C"
    # a place where some candidate has not run is reported but stays outside the rule
    del cells["c"]["C"]
    v = rc.apply_rule(cells, ["nll", "p", "A", "B", "C"], fixed=["nll", "p"])
    assert v["places_in_rule"] == ["a", "b"] and "c" in v["tables"] and len(v["per"]["C"]["ranks"]) == 2


def test_stage_two_takes_those_within_two_se_on_seed_zero():
    cell = {c: {0: h} for c, h in dict(nll=_hits(0.50), p=_hits(0.30), A=_hits(0.495), B=_hits(0.60),
                                        D=_hits(0.45)).items()}
    cell["nll"][1] = _hits(0.0)  # a later seed never moves the stage-2 choice
    # A: 0.005 behind, s.e. 0.0035: behind by one s.e. but within two; D: 0.05 behind, s.e. 0.011: out; B ahead: in
    assert rc.stage_two(cell, fixed=["nll", "p"]) == ["nll", "A", "B"]


# ------------------------------------------------------------------------------------------------ run log, bases


def test_run_log_resumes_replaces_and_keeps_other_fields(tmp_path):
    path = str(tmp_path / "r.json")
    log = common.RunLog(path)
    log.record["places"] = {"a": {"x": 1}}
    log.add(dict(key="k1", hits=[1, 0, 1]))
    log.add(dict(key="k2", hits=[0]))
    log.add(dict(key="k1", hits=[1, 1, 1]))  # the same key replaces
    again = common.RunLog(path)
    assert "k1" in again and "k2" in again and "k3" not in again and len(again) == 2
    assert again.record == {"places": {"a": {"x": 1}}} and again.runs[-1]["hits"] == [1, 1, 1]
    assert len(open(path).read().splitlines()) < 12  # one line per run
    jl = common.RunLog(str(tmp_path / "r.runs.jsonl"), key=lambda r: (r["row"], r["seed"]))
    jl.add(dict(row="x", seed=0, acc=0.5))
    jl.add(dict(row="x", seed=1, acc=0.6))
    back = common.RunLog(str(tmp_path / "r.runs.jsonl"), key=lambda r: (r["row"], r["seed"]))
    assert ("x", 1) in back and ("x", 2) not in back and [r["acc"] for r in back.runs] == [0.5, 0.6]


def test_runs_of_a_rebuilt_base_that_differs_are_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights A")
    sha = common.weights_sha256(str(tmp_path))
    assert len(sha) == 16 and sha == common.weights_sha256(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"weights B")
    assert common.weights_sha256(str(tmp_path)) != sha
    recorded = dict(base_exact_match=0.5, probe=dict(mean_p=0.7676, token_top1=0.8), base_sha256="a" * 16,
                    base_hits=[1, 0, 1, 0])
    assert rc.check_same_base("strong", recorded, dict(recorded), "out.json") is None  # the very base
    # weights that differ by rounding and measure the same: accepted, and the rebuild is recorded
    rebuilt = dict(recorded, base_sha256="b" * 16, probe=dict(mean_p=0.76765, token_top1=0.80005))
    record = rc.check_same_base("strong", recorded, rebuilt, "out.json")
    assert record["base_sha256"] == "b" * 16 and record["probe"] == rebuilt["probe"] and record["hits_identical"]
    # another base: one problem answered otherwise, or the probe off by more than the tolerance
    for other in (dict(rebuilt, base_hits=[1, 0, 0, 0]), dict(rebuilt, probe=dict(mean_p=0.7678, token_top1=0.8)),
                  dict(rebuilt, probe=dict(mean_p=0.7676, token_top1=0.8002))):
        with pytest.raises(SystemExit, match="is not the base of the runs in out.json"):
            rc.check_same_base("strong", recorded, other, "out.json")


def test_absorb_joins_another_workers_places_and_runs(tmp_path):
    main, other = common.RunLog(str(tmp_path / "a.json")), common.RunLog(str(tmp_path / "b.json"))
    main.record["places"] = {"weak": dict(key="kw", base_sha256="s0")}
    main.add(dict(key="weak|x|0", hits=[1]))
    other.record["places"] = {"mid": dict(key="km", base_sha256="s0"), "weak": dict(key="kw", base_sha256="s0")}
    other.add(dict(key="mid|x|0", hits=[0, 1]))
    other.add(dict(key="weak|x|0", hits=[0]))  # a key in both keeps main's
    rc.absorb(main, other.path)
    back = common.RunLog(main.path)
    assert set(back.record["places"]) == {"weak", "mid"} and len(back) == 2
    assert {r["key"]: r["hits"] for r in back.runs} == {"weak|x|0": [1], "mid|x|0": [0, 1]}
    # what only the other worker measured at a place joins: a rebuild accepted there, the signals at step 1
    other.record["places"]["weak"].update(rebuilt_bases=[dict(base_sha256="r1")], start=dict(signals={"s": 0.5}))
    other.save()
    rc.absorb(main, other.path)
    weak = common.RunLog(main.path).record["places"]["weak"]
    assert [b["base_sha256"] for b in weak["rebuilt_bases"]] == ["r1"] and weak["start"] == dict(signals={"s": 0.5})
    other.record["places"]["weak"]["base_sha256"] = "s1"  # measured on another base: refused
    other.save()
    with pytest.raises(SystemExit, match="place weak was measured on another base"):
        rc.absorb(main, other.path)


def test_candidates_join_when_accepted(monkeypatch):
    monkeypatch.setattr(rc, "accepted", lambda kw: kw["objective"] in ("nll", "asft", "deft"))
    assert [n for n, _ in rc.available_candidates()] == ["nll", "auto", "deft", "asft", rc.PROBE]
    assert [n for n, _ in rc.available_candidates(["asft", "probe", "p"])] == ["asft", rc.PROBE]


def test_unknown_objective_is_not_accepted():
    assert rc.accepted(dict(objective="p")) and not rc.accepted(dict(objective="no_such_objective"))
    assert set(rc.FIXED) <= {n for n, _ in rc.CANDIDATES}
    # candidates that resolve alike share their runs; different ones do not
    assert rc.training_of(dict(objective="p", objective_schedule="adaptive")) == rc.training_of(
        dict(objective="p", objective_schedule="adaptive", schedule_signal="sequence_top1"))
    assert rc.training_of(dict(objective="p", objective_schedule="adaptive")) != rc.training_of(
        dict(objective="p", objective_schedule="adaptive", schedule_signal="token_top1"))
    assert rc.training_of(dict(objective="p")) != rc.training_of(dict(objective="p", objective_schedule="adaptive"))
    # the pinned `auto` (the rule's commit) trains what objective="auto" resolved to then: adaptive toward deft
    assert dict(rc.CANDIDATES)["auto"] == dict(objective="deft", objective_schedule="adaptive", schedule_signal="token_top1")


def test_trl_prob_auto_is_the_winner_of_the_committed_results():
    """The rule applied afresh to the committed runs names the winner the results file records, and trl_prob's
    ``auto`` trains exactly what that candidate trains (so ``auto`` cannot drift from the evidence unnoticed)."""
    from trl_prob.auto import AUTO_SETTINGS

    with open(rc.OUT) as f:
        record = json.load(f)
    candidates = rc.available_candidates()
    _, verdict = rc.rule_over(record["runs"], record["places"], list(record["places"]), candidates)
    assert len(verdict["places_in_rule"]) == 5 and verdict["auto"] == record["summary"]["auto"]
    assert rc.training_of(dict(candidates)[verdict["auto"]]) == rc.training_of(dict(objective="auto"))
    assert rc.training_of(dict(objective="auto")) == rc.training_of(AUTO_SETTINGS)


def test_fixed_objectives_keep_the_training_ids_of_the_committed_runs():
    """The default signal moved (token_top1 -> sequence_top1); a fixed objective's training does not read it, so its
    id must not move, or v2 would train v1's fixed runs again instead of sharing them."""
    with open(rc.OUT) as f:
        runs = json.load(f)["runs"]
    for name in ("nll", "p", "eaft:1", "asft", "deft_cayley"):
        recorded = {r["training"] for r in runs if r["config"] == {"objective": name}}
        assert recorded == {rc.training_of(dict(objective=name))}, name
    # v1's schedules followed token_top1: pinned, they keep their runs too
    recorded = {r["training"] for r in runs if r["objective"] == "adaptive->p"}
    assert recorded == {rc.training_of(dict(rc.CANDIDATES)["adaptive->p"])}


# ------------------------------------------------------------------------------------------------ v2 (issue 34)


def test_combined_difference_counts_problems_and_seed_spread_by_hand():
    a = {0: [1, 1, 0, 1], 1: [1, 0, 0, 1], 2: [1, 1, 1, 1]}  # exact match 0.75, 0.5, 1.0
    b = {0: [0, 1, 0, 1], 1: [0, 1, 0, 0]}  # 0.5, 0.25
    d = rc.combined_difference(a, b)
    per_problem = [statistics.fmean(x) - statistics.fmean(y) for x, y in zip(zip(*a.values()), zip(*b.values()))]
    assert d["mean"] == pytest.approx(statistics.fmean(per_problem))
    se_problems = statistics.stdev(per_problem) / math.sqrt(4)
    var_seeds = statistics.variance([0.75, 0.5, 1.0]) / 3 + statistics.variance([0.5, 0.25]) / 2
    assert d["se_problems"] == pytest.approx(se_problems)
    assert d["se"] == pytest.approx(math.sqrt(se_problems**2 + var_seeds))
    one = rc.combined_difference({0: a[0]}, {0: b[0]})  # one seed each: only the problems count
    assert one["se_seeds"] == 0 and one["se"] == pytest.approx(one["se_problems"])


def _seeded(accs, n=400, seed=0):
    """{seed: hits} with the given exact match per seed (problems drawn at random)."""
    rng = random.Random(seed)
    return {s: [int(rng.random() < acc) for _ in range(n)] for s, acc in enumerate(accs)}


def test_seed_spread_turns_a_one_seed_call_level():
    """On seed 0 alone the gap is several problem-s.e.; with three seeds whose spread is as large as the gap, the
    combined s.e. reads the same gap as level: a single seed cannot flip the call."""
    nll = _seeded([0.50, 0.50, 0.50], seed=1)
    wobbly = {0: [0] * 120 + nll[0][120:], 1: nll[1][:], 2: [1] * 60 + nll[2][60:]}  # seed 0 far behind, seed 2 ahead
    cell = {"nll": nll, "wobbly": wobbly}
    first = rc.place_table_v2({c: {0: s[0]} for c, s in cell.items()}, fixed=["nll"])
    assert first["candidates"]["wobbly"]["standing"] == "behind"
    table = rc.place_table_v2(cell, fixed=["nll"])
    r = table["candidates"]["wobbly"]
    assert r["se_seeds"] > r["se_problems"] and r["standing"] == "level"


def test_rule_v2_finds_a_schedule_ahead_of_both_endpoints(monkeypatch):
    monkeypatch.setitem(rc.ENDPOINTS_V2, "sched", ("nll", "p"))
    cells = {"traj": {"nll": _seeded([0.40, 0.41, 0.39], seed=2), "p": _seeded([0.05, 0.06, 0.05], seed=3),
                      "sched": _seeded([0.60, 0.61, 0.59], seed=4)},
             "mid": {"nll": _seeded([0.40, 0.40, 0.40], seed=5), "p": _seeded([0.40, 0.40, 0.40], seed=6),
                     "sched": _seeded([0.40, 0.40, 0.40], seed=7)}}
    verdict = rc.apply_rule_v2(cells, ["nll", "p", "sched"], fixed=["nll", "p"])
    assert verdict["auto"] == "sched" and verdict["goal"]["auto_never_behind"]
    assert verdict["goal"]["schedule_ahead_of_both_endpoints"] == {"traj": ["sched"]} and verdict["goal"]["met"]
    assert verdict["tables"]["traj"]["candidates"]["sched"]["vs_endpoints"]["p"]["standing"] == "ahead"
    assert "p" in verdict["per"] and verdict["per"]["p"]["behind"] == ["traj"]
    # stage 2: p is out of contention at traj (far behind on seed 0), the others stay
    assert sorted(rc.in_contention(cells["traj"], fixed=["nll", "p"])) == ["nll", "sched"]


def test_spearman_and_the_schedule_moving_average_by_hand():
    assert rc.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rc.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rc.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.8 / math.sqrt(0.9 * 1.0) * (1.0 if True else 0),
                                                                    rel=0.2)
    assert math.isnan(rc.spearman([1, 1, 1], [1, 2, 3]))
    ema = rc.signal_ema_at([0.0, 1.0, None, 1.0], 0.5, [0, 1, 2, 4])
    assert ema[0] == 0.5 and ema[1] == pytest.approx(0.45) and ema[2] == pytest.approx(0.505)
    assert ema[3] == pytest.approx(0.9 * 0.505 + 0.1)  # step 3 had no signal (None): the average holds


def test_signal_rule_and_pilot_test_on_synthetic_runs():
    place_info = {
        "mid": dict(base_exact_match=0.018, start=dict(signals=dict(sequence_top1=0.0, token_top1=0.64),
                                                      lambda_at_start=dict(sequence_top1=0.0, token_top1=1.0))),
        "traj": dict(base_exact_match=0.0, start=dict(signals=dict(sequence_top1=0.0, token_top1=0.4),
                                                     lambda_at_start=dict(sequence_top1=0.0, token_top1=0.4))),
        "strong": dict(base_exact_match=0.52, start=dict(signals=dict(sequence_top1=0.5, token_top1=0.9),
                                                        lambda_at_start=dict(sequence_top1=1.0, token_top1=1.0))),
    }
    curve = [dict(step=s, exact_match=e) for s, e in [(0, 0.0), (2, 0.1), (4, 0.3), (6, 0.5)]]
    runs = [dict(place="traj", objective="nll", seed=0, curve=curve,
                 signal_trace=dict(sequence_top1=[0.0, 0.1, 0.2, 0.3, 0.5, 0.6], token_top1=[0.9, 0.5] * 3))]
    rule = rc.signal_rule(place_info, runs)
    assert rule["signals"]["sequence_top1"]["eligible"] and not rule["signals"]["token_top1"]["eligible"]
    assert rule["signals"]["sequence_top1"]["mean_spearman"] == pytest.approx(1.0)
    assert rule["chosen"] == "sequence_top1"
    assert rc.qualifies("traj", runs) == dict(qualifies=True, start=0.0, max=0.5, mid=0.3, last=0.5, rises=True,
                                              stalls_late=None)
    noisy = [dict(runs[0], place="traj_noise25")]
    assert rc.qualifies("traj_noise25", noisy)["qualifies"] is False  # still rising: no late stall
    assert rc.qualifies("traj_noise25", [])["qualifies"] is None


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def tiny_model(tmp_path):
    from addition import build_tokenizer, random_tiny_llama

    tok = build_tokenizer()
    tok.model_max_length = 1024
    model = random_tiny_llama(seed=0, max_position_embeddings=1024)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _answer(question: str) -> str:
    """A stand-in for greedy decoding: the right equation for questions of even length, "0" otherwise."""
    return "0" if len(question) % 2 else _RIGHT[question]


_RIGHT: dict = {}


@pytest.mark.timeout(900)
def test_harness_end_to_end_saves_hits_in_test_order_and_resumes(tiny_model, tmp_path, monkeypatch):
    problems = rc.load_problems()
    _RIGHT.update({r["question"]: r["equation"] for rows in problems.values() for r in rows if r["equation"]})
    monkeypatch.setattr(rc, "generate_answers", lambda model, tok, questions, bs, n: [_answer(q) for q in questions])
    out = str(tmp_path / "rc.json")
    argv = ["--design", "v1", "--model", tiny_model, "--places", "mid", "strong_noise25", "--only", "nll", "p", "probe",
            "--stage", "1", "--train_rows", "8", "--epochs", "1", "--batch", "4", "--test_limit", "6",
            "--warmup_rows", "8", "--warmup_rounds", "1", "--probe_rows", "8", "--max_length", "1024",
            "--max_new_tokens", "4", "--eval_batch", "6", "--threads", "1", "--cache_dir", str(tmp_path / "cache"),
            "--out", out]
    rc.main(argv)
    with open(out) as f:
        record = json.load(f)
    args = rc.parse_args(argv)
    places = record["places"]
    for place in ("mid", "strong_noise25"):
        test = rc.place_splits(place, args, problems)["test"]
        expected = [int(len(r["question"]) % 2 == 0) for r in test]  # the stand-in is right on even lengths
        info = places[place]
        assert info["base_hits"] == expected and info["base_exact_match"] == pytest.approx(statistics.fmean(expected))
        op = rc.most_common_operator([r["equation"] for r in rc.place_splits(place, args, problems)["train_clean"]])
        assert info["trivial_operator"] == op
        assert info["trivial_baseline"] == pytest.approx(statistics.fmean(rc.trivial_hits(test, op)))
        assert info["test_rows"] == 6 and info["probe"]["mean_p"] < 0.1
        # a random model sits at the weak end: the probe recommends plain NLL, so `probe` shares nll's run
        assert info["probe_recommends"] == {"objective": "nll"}
        runs = [r for r in record["runs"] if r["place"] == place]
        assert sorted(r["objective"] for r in runs) == ["nll", "p"] and all(r["seed"] == 0 for r in runs)
        for r in runs:
            assert r["hits"] == expected and r["test_acc"] == pytest.approx(statistics.fmean(expected))
            assert r["steps"] == 2  # one pass over 8 rows at batch 4
    assert places["strong_noise25"]["base_dir"] != tiny_model and places["strong_noise25"]["warmup_base"]["rounds"]
    assert places["mid"]["base_dir"] == tiny_model and places["mid"]["strong_enough"] is None
    assert set(record["tables"]) == {"mid", "strong_noise25"}
    assert record["summary"]["places_in_rule"] == ["mid", "strong_noise25"]
    assert set(record["summary"]["ranking"]) == {"nll", "p", "probe"}

    # A rerun trains nothing and measures no place again ...
    def refuse(*a, **k):
        raise AssertionError("a finished run ran again")

    monkeypatch.setattr(rc, "measure_place", refuse)
    monkeypatch.setattr(rc, "run_one", refuse)
    rc.main(argv)
    with open(out) as f:
        assert len(json.load(f)["runs"]) == 4
    # ... and one with a candidate more trains only that one's runs.
    added = []
    monkeypatch.undo()
    monkeypatch.setattr(rc, "generate_answers", lambda model, tok, questions, bs, n: [_answer(q) for q in questions])
    real_run_one, real_measure_place = rc.run_one, rc.measure_place
    monkeypatch.setattr(rc, "measure_place", refuse)
    monkeypatch.setattr(rc, "run_one", lambda *a, **k: added.append((a[0], a[3])) or real_run_one(*a, **k))
    argv[argv.index("probe") + 1 : argv.index("probe") + 1] = ["dft"]
    rc.main(argv)
    assert sorted(added) == [("mid", "dft"), ("strong_noise25", "dft")]
    with open(out) as f:
        assert len(json.load(f)["runs"]) == 6
    # --check: seeds 1 and 2 of a named candidate at every place, whatever its standing, in a file of its own
    added.clear()
    check = str(tmp_path / "check.json")
    rc.main(argv[: argv.index("--out")] + ["--out", check, "--absorb", out, "--check", "p"])
    assert sorted(added) == sorted([("mid", "p"), ("strong_noise25", "p")] * 2)
    with open(check) as f:
        runs = json.load(f)["runs"]
    assert sorted((r["place"], r["seed"]) for r in runs if r["objective"] == "p") == sorted(
        (place, seed) for place in ("mid", "strong_noise25") for seed in (0, 1, 2))
    with open(out) as f:
        assert len(json.load(f)["runs"]) == 6  # the verdict's file is untouched
    with pytest.raises(SystemExit):
        rc.parse_args(["--check", "p"])  # not into the verdict's file
    # --seeds: a worker runs only the seeds it is given (two workers split one candidate's seeds)
    added.clear()
    split = str(tmp_path / "seed2.json")
    rc.main(argv[: argv.index("--out")] + ["--out", split, "--absorb", out, "--check", "p", "--seeds", "2"])
    assert sorted(added) == [("mid", "p"), ("strong_noise25", "p")]
    with open(split) as f:
        runs = json.load(f)["runs"]
    assert sorted((r["place"], r["seed"]) for r in runs if r["objective"] == "p") == sorted(
        (place, seed) for place in ("mid", "strong_noise25") for seed in (0, 2))
    with pytest.raises(SystemExit):
        rc.parse_args(["--seeds", "3"])  # the rule's seeds are 0, 1, 2
    # A warm-up base rebuilt on another machine, its weights another hash, that measures the same (every hit, the
    # probe): measured once, accepted and recorded beside the place; its runs join, marked; mid's base is untouched.
    real_sha = rc.weights_sha256
    monkeypatch.setattr(rc, "weights_sha256", lambda d: "f" * 16 if d != tiny_model else real_sha(d))
    monkeypatch.setattr(rc, "measure_place", real_measure_place)
    added.clear()
    rc.main(argv)
    assert added == []  # the recorded runs stand for this base
    with open(out) as f:
        places = json.load(f)["places"]
    assert [b["base_sha256"] for b in places["strong_noise25"]["rebuilt_bases"]] == ["f" * 16]
    assert places["strong_noise25"]["base_sha256"] != "f" * 16 and "rebuilt_bases" not in places["mid"]
    monkeypatch.setattr(rc, "measure_place", refuse)  # accepted once: not measured again
    rebuilt = str(tmp_path / "rebuilt.json")
    rc.main(argv[: argv.index("--out")] + ["--out", rebuilt, "--absorb", out, "--check", "p", "--seeds", "1"])
    assert sorted(added) == [("mid", "p"), ("strong_noise25", "p")]
    with open(rebuilt) as f:
        marks = {r["place"]: r.get("base_rebuilt_sha256") for r in json.load(f)["runs"] if r["seed"] == 1}
    assert marks == {"mid": None, "strong_noise25": "f" * 16}


@pytest.mark.timeout(900)
def test_trajectory_place_records_its_curve_and_every_signal(tiny_model, tmp_path, monkeypatch):
    """v2 end to end on a tiny model: a trajectory place records the signals at step 1 (and the lambda each gives),
    the base's held-out exact match, and per run a curve from step 0 through every evaluation and each signal per
    step; the rule's summary (with its readings, the signal rule and the pilot's test) lands beside v1's."""
    problems = rc.load_problems()
    _RIGHT.update({r["question"]: r["equation"] for rows in problems.values() for r in rows if r["equation"]})
    monkeypatch.setattr(rc, "generate_answers", lambda model, tok, questions, bs, n: [_answer(q) for q in questions])
    out = str(tmp_path / "rc2.json")
    argv = ["--smoke", "--model", tiny_model, "--places", "traj_noise25", "--only", "nll", "seq->p", "--batch", "4",
            "--max_length", "1024", "--max_new_tokens", "4", "--threads", "1", "--out", out]
    rc.main(argv)
    with open(out) as f:
        record = json.load(f)
    start = record["places"]["traj_noise25"]["start"]
    assert set(start["signals"]) == set(rc.SIGNAL_CANDIDATES) and 0.0 <= start["curve_exact_match"] <= 1.0
    for name, value in start["signals"].items():
        low, high = __import__("trl_prob.schedules", fromlist=["SIGNALS"]).SIGNALS[name].ramp
        assert start["lambda_at_start"][name] == pytest.approx(min(1.0, max(0.0, (value - low) / (high - low))))
    runs = record["runs"]
    assert sorted(r["objective"] for r in runs) == ["nll", "seq->p"]
    for r in runs:
        assert r["steps"] == 2 and [c["step"] for c in r["curve"]] == [0, 1, 2]  # 8 rows at batch 4, eval every step
        assert r["curve"][0]["exact_match"] == start["curve_exact_match"]
        assert set(r["signal_trace"]) == set(rc.SIGNAL_CANDIDATES)
        assert all(len(v) == 2 and all(x is not None for x in v) for v in r["signal_trace"].values())
    seq = next(r for r in runs if r["objective"] == "seq->p")
    assert seq["lambda_path"] and seq["resolved"]["schedule_signal"] == "sequence_top1"
    summary = record["summary_v2"]
    assert set(summary["readings"]) == {"1 s.e.", "seed 0 alone"} and "traj_noise25" in summary["pilot"]
    assert set(summary["signal_rule"]["signals"]) == set(rc.SIGNAL_CANDIDATES)
    assert "summary" not in record  # v1's verdict is written only by --design v1


# ------------------------------------------------------------------------------------------------ mawps_example


def test_mawps_example_scores_the_equation_it_writes():
    """benchmarks/mawps_example.py scores the value of the equation the model writes: every reference equation in
    examples/data/mawps scores as correct against its own answer, a wrong value does not, train and test share no
    problem, and the recipe trains on the shipped rows."""
    import argparse

    import mawps_example as example

    data = os.path.join(ROOT, "examples", "data", "mawps")
    assert example.DATA == data and example.OUT == os.path.join(ROOT, "benchmarks", "results", "mawps_example.json")
    rows = {name: [json.loads(line) for line in open(os.path.join(data, f"{name}.jsonl"))] for name in ("train", "test")}
    assert (len(rows["train"]), len(rows["test"])) == (288, 200)
    for row in rows["train"] + rows["test"]:
        equation = row["completion"][0]["content"]
        assert example.same_number(example.predicted_value(equation, "equation"), row["answer"]), equation
        assert not example.same_number(example.predicted_value(equation, "equation"), str(float(row["answer"]) + 1))
    assert example.predicted_value("676 - 224 = 450", "equation") == "452"  # the equation counts, not its arithmetic
    assert example.predicted_value("I think the answer is 7.", "equation") == "7"  # no equation: the stated number
    questions = {name: {r["prompt"][0]["content"] for r in rs} for name, rs in rows.items()}
    assert not questions["train"] & questions["test"]
    _, training_args, model_args = example.parsed([], argparse.Namespace(model="any/model", max_steps=None))
    assert training_args.objective_auto and model_args.use_peft  # the recipe trains `auto`, with LoRA
    assert example.standard_error(0.25, 200) == pytest.approx((0.25 * 0.75 / 200) ** 0.5)
