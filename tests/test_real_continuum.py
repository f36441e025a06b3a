"""benchmarks/real_continuum.py: answer extraction, the summary / selection rule on a synthetic table, and the
harness end to end (a tiny random Llama in place of SmolLM2, a few real problems): the JSON holds every run and a
rerun skips them."""

from __future__ import annotations

import json
import os

import pytest

import real_continuum as rc


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
    assert rc.extract_answer(text) == expected


def test_same_number_and_format():
    assert rc.same_number("43", "43") and rc.same_number("43.0", "43") and rc.same_number("2.50", "2.5")
    assert not rc.same_number("44", "43") and not rc.same_number(None, "1") and not rc.same_number("1.2.3", "1")
    assert [rc.format_number(x) for x in (43.0, "2.50", "1,000", 0.125)] == ["43", "2.5", "1000", "0.125"]


def test_noisy_answer_is_wrong_and_plausible():
    import random

    rng = random.Random(0)
    for answer in ("0", "1", "15", "2.5"):
        for _ in range(20):
            wrong = rc.noisy_answer(answer, rng)
            assert wrong != answer and float(wrong) >= 0 and 1 <= abs(float(wrong) - float(answer)) <= 10


def test_equation_rows_are_checked():
    assert rc.equation_ok(dict(equation="290 / 2", answer="145"))
    assert not rc.equation_ok(dict(equation="163/84", answer="2"))  # rounded in the data: left out
    assert not rc.equation_ok(dict(equation="x:age; 4x", answer="5"))
    assert not rc.equation_ok(dict(equation=None, answer="5"))


@pytest.mark.parametrize(
    "text, fmt, expected",
    [
        ("290 / 2", "equation", "145"),
        ("(4 + 22) - 6", "equation", "20"),
        ("( 4 + 22 - 6 ) = 18. The answer is 18.", "equation", "20"),  # the expression is scored, not its claim
        ("7 * 3.", "equation", "21"),
        ("5 / 0", "equation", None),  # division by zero: no value, and no "answer is" / number to fall back on ...
        ("- + 4 22 6", "prefix", "20"),
        ("/ 290 2\nmore text", "prefix", "145"),
        ("+ 4", "prefix", "4"),  # malformed prefix: falls back to the last number
        ("The answer is 12.", "equation", "12"),  # not an expression: the trained answer format
        ("2 + 2", "answer", "2"),  # the answer format never computes
    ],
)
def test_predicted_value(text, fmt, expected):
    if text == "5 / 0":
        assert rc.evaluate_infix(text) is None and rc.predicted_value(text, fmt) == "0"  # ... but the last number
        return
    assert rc.predicted_value(text, fmt) == expected


def test_prefix_round_trip_and_rejects():
    for infix in ("290 / 2", "(4 + 22) - 6", "4 + 22 * 6", "((1 + 2) * (3 - 4)) / 5"):
        assert rc.evaluate_prefix(rc.to_prefix(infix)) == pytest.approx(rc.evaluate_infix(infix))
    assert rc.to_prefix("(4 + 22) - 6") == "- + 4 22 6"
    assert rc.evaluate_prefix("+ 1 2 3") is None and rc.evaluate_prefix("+ 1 x") is None and rc.evaluate_prefix("") is None
    assert rc.evaluate_infix("__import__('os')") is None and rc.evaluate_infix("2 ** 3") is None


def test_noisy_equation_is_wrong():
    import random

    rng = random.Random(0)
    for eq, answer in (("290 / 2", "145"), ("30 - 11", "19"), ("(4 + 22) - 6", "20"), ("2 * 2", "4"), ("0 + 0", "0")):
        for _ in range(10):
            wrong = rc.noisy_equation(eq, answer, rng)
            assert rc.evaluate_infix(wrong) is not None and not rc.same_number(
                rc.predicted_value(wrong, "equation"), answer), (eq, wrong)


def test_splits_are_disjoint_and_noise_is_counted():
    problems = rc.load_problems()
    args = rc.parse_args(["--steps", "5", "--test_rows", "200", "--warmup_rows", "40"])
    mid, noisy = rc.place_splits("mid", args, problems), rc.place_splits("strong_noise20", args, problems)
    q = lambda rows: {r["prompt"][0]["content"] for r in rows}  # noqa: E731
    test = {r["question"] for r in mid["test"]}
    assert len(test) == 200 and not test & q(mid["train"]) and not test & q(noisy["warm"])
    assert not q(noisy["train"]) & q(noisy["warm"])
    assert {r["question"] for r in noisy["test"]} == test  # same shuffle: a warm-up row is never a test row
    answers = {r["question"]: r["answer"] for rows in problems.values() for r in rows}
    wrong = [not rc.same_number(rc.predicted_value(r["completion"][0]["content"], "equation"),
                                answers[r["prompt"][0]["content"]]) for r in noisy["train"]]
    assert sum(wrong) == round(0.2 * len(noisy["train"]))
    assert not any(not rc.same_number(rc.predicted_value(r["completion"][0]["content"], "equation"),
                                      answers[r["prompt"][0]["content"]]) for r in mid["train"] + noisy["warm"])
    weak = rc.place_splits("weak", args, problems)
    assert all(rc.same_number(rc.predicted_value(r["completion"][0]["content"], "prefix"),
                              answers[r["prompt"][0]["content"]]) for r in weak["train"])


def _run(place, name, seed, acc, mean_p_after=0.5, lambdas=None):
    return dict(place=place, objective=name, seed=seed, test_acc=acc, mean_p_after=mean_p_after, lambda_path=lambdas)


def test_summary_and_selection_on_a_synthetic_table():
    runs = []
    accs = {  # place -> objective -> per-seed accuracy
        "a": {"nll": [0.50, 0.52, 0.54], "p": [0.30, 0.32, 0.34], "default": [0.49, 0.51, 0.53]},
        "b": {"nll": [0.20, 0.22, 0.24], "p": [0.40, 0.42, 0.44], "default": [0.30, 0.32, 0.34]},
        "c": {"nll": [0.40, 0.45, 0.50], "p": [0.41, 0.46, 0.51], "default": [0.60, 0.62, 0.64]},
    }
    for place, objs in accs.items():
        for name, xs in objs.items():
            runs += [_run(place, name, s, x, lambdas=[0.0, 0.5, 1.0] if name == "default" else None)
                     for s, x in enumerate(xs)]
    s = rc.summarise(runs)
    cell = s["table"]["a"]["nll"]
    assert cell["mean"] == pytest.approx(0.52) and cell["se"] == pytest.approx(0.02 / 3**0.5) and cell["n"] == 3
    assert s["table"]["a"]["default"]["lambda_path_mean"] == [0.0, 0.5, 1.0]
    g = s["goal"]
    assert g["a"]["best_fixed"] == "nll" and g["a"]["separated"] and g["a"]["default_within"] and g["a"]["met"]
    assert g["b"]["best_fixed"] == "p" and g["b"]["separated"] and not g["b"]["default_within"] and not g["b"]["met"]
    assert not g["c"]["separated"] and g["c"]["default_within"]  # default ahead of both: within, but no separation
    assert not s["goal_met_everywhere"]
    per = s["selection"]["per"]
    assert per["default"]["behind"] == ["b"] and per["default"]["ahead"] == ["c"]
    assert per["nll"]["behind"] == ["b"] and per["nll"]["ahead"] == [] and per["p"]["behind"] == ["a"]
    # default and nll tie on places behind; default is ahead somewhere -> first; nll and p tie on both -> mean rank
    assert s["selection"]["ranking"][0] == "default"
    assert per["nll"]["mean_rank"] == pytest.approx((1 + 3 + 3) / 3) and per["p"]["mean_rank"] == pytest.approx(2)
    assert s["selection"]["ranking"][1:] == ["p", "nll"]
    assert "NOT separated" in rc.format_summary(s, {})


def test_optional_candidates_join_when_accepted(monkeypatch):
    monkeypatch.setattr(rc, "accepted", lambda kw: kw["objective"] in ("deft", "auto"))
    names = [n for n, _ in rc.available_candidates()]
    assert names == ["nll", "p", "default", "deft", "auto"]


def test_unknown_objective_is_not_accepted():
    assert rc.accepted(dict(objective="p")) and not rc.accepted(dict(objective="no_such_objective"))


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


def test_harness_end_to_end_and_resume(tiny_model, tmp_path, monkeypatch):
    out = str(tmp_path / "rc.json")
    argv = ["--model", tiny_model, "--places", "mid", "strong_noise20", "--seeds", "0", "--only", "nll", "default",
            "--steps", "2", "--batch", "4", "--test_rows", "6", "--warmup_rows", "8", "--warmup_steps", "1",
            "--probe_rows", "8", "--max_length", "1024", "--max_new_tokens", "4", "--eval_batch", "6",
            "--cache_dir", str(tmp_path / "cache"), "--out", out]
    rc.main(argv)
    with open(out) as f:
        record = json.load(f)
    runs = record["runs"]
    assert sorted((r["place"], r["objective"], r["seed"]) for r in runs) == sorted(
        (p, o, 0) for p in ("mid", "strong_noise20") for o in ("nll", "default"))
    for r in runs:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 < r["mean_p_before"] < 1.0 and 0.0 < r["mean_p_after"] < 1.0
        assert (r["lambda_path"] is None) == (r["objective"] == "nll")
        assert r["lambda_path"] is None or len(r["lambda_path"]) == 2
    places = record["places"]
    assert places["strong_noise20"]["base_dir"] != tiny_model and os.path.isdir(places["strong_noise20"]["base_dir"])
    assert places["mid"]["base_dir"] == tiny_model and places["mid"]["test_rows"] == 6
    assert set(record["summary"]["table"]) == {"mid", "strong_noise20"}
    assert os.path.exists(out.replace(".json", ".png"))

    # A rerun trains nothing and measures no place again ...
    def refuse(*a, **k):
        raise AssertionError("a finished run ran again")

    monkeypatch.setattr(rc, "measure_place", refuse)
    monkeypatch.setattr(rc, "run_one", refuse)
    rc.main(argv)
    with open(out) as f:
        assert len(json.load(f)["runs"]) == 4
    # ... and one with a candidate more (as when trl_prob starts accepting deft) trains only that one's runs.
    added = []
    monkeypatch.undo()
    real_run_one = rc.run_one
    monkeypatch.setattr(rc, "measure_place", refuse)
    monkeypatch.setattr(rc, "run_one", lambda *a, **k: added.append((a[0], a[3])) or real_run_one(*a, **k))
    argv[argv.index("default") + 1 : argv.index("default") + 1] = ["p"]
    rc.main(argv)
    assert sorted(added) == [("mid", "p"), ("strong_noise20", "p")]
    with open(out) as f:
        assert len(json.load(f)["runs"]) == 6


def test_runs_of_a_rebuilt_base_that_differs_are_refused(tmp_path):
    """A warm-up base is rebuilt on each machine and floating point differs between CPUs: adding runs to a place whose
    base now measures (or hashes) differently stops with one line naming both bases; the same base passes."""
    (tmp_path / "model.safetensors").write_bytes(b"weights A")
    sha = rc.weights_sha256(str(tmp_path))
    assert len(sha) == 16 and sha == rc.weights_sha256(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"weights B")
    assert rc.weights_sha256(str(tmp_path)) != sha

    recorded = dict(base_test_acc=0.2, probe=dict(mean_p=0.7676))  # measured before bases were hashed
    rc.check_same_base("strong", recorded, dict(recorded, base_sha256="x"), "out.json")
    with pytest.raises(SystemExit, match=r"place strong: the base built here \(exact match 0\.185.*exact match 0\.200"):
        rc.check_same_base("strong", recorded, dict(base_test_acc=0.185, probe=dict(mean_p=0.7701), base_sha256="x"),
                           "out.json")
    hashed = dict(recorded, base_sha256="a" * 16)
    with pytest.raises(SystemExit, match="is not the base of the runs in out.json"):
        rc.check_same_base("strong", hashed, dict(recorded, base_sha256="b" * 16), "out.json")  # same scores, other weights
