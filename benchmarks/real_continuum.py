"""The benchmark of record (issue 27): which objective or schedule wins on a real model, at places that span the
capability continuum, by a rule committed before the runs (benchmarks/README.md, "Real-model continuum").

SmolLM2-135M-Instruct, LoRA SFT (r=8 on the top 6 of 30 layers) on real math word problems, on CPU (or ``--device
cuda``). Data (benchmarks/data/real_continuum/, sources and licences in its README): MAWPS SingleOp + AddSub and SVAMP,
as chat rows whose completion is the equation that answers the problem; the harness computes the value of the equation
the model writes (``common.predicted_value``), so the model is scored on choosing numbers and operations.

Places (PLACES), each measured before training (probe mean p and token_top1 on its training rows, base exact match,
a trivial baseline): ``weak`` (prefix equations), ``mid`` (infix, the base as it is), ``strong`` (infix, a base made
competent by a longer NLL warm-up on disjoint rows, merged and cached), ``strong_noise25`` (the same base, 25% of the
training labels with one operator swapped), ``svamp`` (SVAMP's own equations: a second data set).

Candidates (CANDIDATES; ``asft`` and any other joins by itself once trl_prob accepts it, see :func:`accepted`): the
fixed objectives, the shipped schedule, today's ``auto``, the probe's own recommendation (per place, from the base
before training) and two new ``auto`` designs. One learning rate for all, three passes over the training rows.

Stage 1: every candidate at every place with seed 0 (place by place, nll / auto / eaft:1 first). Stage 2: seeds 1 and 2
for the candidates within two s.e. of the best fixed objective at a place (paired per problem, on seed 0). Every run
saves ``hits`` (0/1 per test problem, in the place's fixed test order).

    python benchmarks/real_continuum.py              # the table, resumable (about 5 h on 2 idle cores; README)
    python benchmarks/real_continuum.py --smoke      # 2 places, 2 candidates, 1 step, 8 test problems (< 3 min idle)
    python benchmarks/real_continuum.py --device cuda
    python benchmarks/real_continuum.py --summary_only

Results: benchmarks/results/real_continuum.json (``runs``: one per line, written as each lands; ``places``; the
``summary`` by the rule). A rerun skips the runs already there (same place, training, seed and settings).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import warnings

from common import (
    NUMBER,
    RunLog,
    average_ranks,
    cache_dir,
    equation_ok,
    evaluate_infix,
    format_number,
    mean_over_seeds,
    mean_se,
    paired_difference,
    predicted_value,
    rank_by_rule,
    same_number,
    smollm2_dir,
    standing,
    to_prefix,
    weights_sha256,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA_DIR = os.path.join(HERE, "data", "real_continuum")
OUT = os.path.join(HERE, "results", "real_continuum.json")

# ------------------------------------------------------------------------------------------------------------------
# Candidates: (name, ProbSFTConfig kwargs), in the order stage 1 runs them at each place. PROBE: the probe's own
# recommendation at the place, made from the base before training.
# ------------------------------------------------------------------------------------------------------------------

PROBE = "probe"
CANDIDATES = [
    ("nll", dict(objective="nll")),
    # `auto` as it was when the rule was committed (086e746: trl_prob/auto.py's AUTO_SETTINGS then), pinned so that the
    # design does not move under the run; the auto shipped since (4e8572e: adaptive toward eaft:1 on token_top1) is
    # the candidate `adaptive->eaft:1` (the same training, so the same runs)
    ("auto", dict(objective="deft", objective_schedule="adaptive", schedule_signal="token_top1")),
    ("eaft:1", dict(objective="eaft:1")),
    ("p", dict(objective="p")),
    ("dft", dict(objective="dft")),
    ("deft", dict(objective="deft")),
    ("deft_cayley", dict(objective="deft_cayley")),
    ("asft", dict(objective="asft")),
    # v1's schedules followed the default signal of their day, token_top1; pinned since the default moved (issue 34)
    ("adaptive->p", dict(objective="p", objective_schedule="adaptive", schedule_signal="token_top1")),  # as shipped
    (PROBE, None),
    # new auto designs: adaptive from NLL toward eaft:1, on the shipped signal (token_top1) and on mean p
    ("adaptive->eaft:1", dict(objective="eaft:1", objective_schedule="adaptive", schedule_signal="token_top1")),
    ("adaptive:mean->eaft:1", dict(objective="eaft:1", objective_schedule="adaptive", schedule_signal="mean")),
]
FIXED = ["nll", "p", "dft", "deft", "deft_cayley", "eaft:1", "asft"]  # "the best fixed objective": best of these

# Issue 34 (v2): the candidates of the rule committed in benchmarks/README.md ("v2: trajectory places and a rule a
# single seed cannot flip") before its first run. `seq` is the new default signal, sequence_top1 (teacher-forced exact
# match of the step's completions); `mean->p` is the mission's schedule as the design asks: NLL -> -p^k on the
# paper's mean p, the power family itself sliding (exponent mode, k = 1); `seq_clean->p` is our own design: the
# noise-aware signal (a label the model confidently contradicts does not spoil a completion).
CANDIDATES_V2 = [
    ("nll", dict(objective="nll")),
    ("p", dict(objective="p")),
    ("eaft:1", dict(objective="eaft:1")),
    ("asft", dict(objective="asft")),
    ("deft_cayley", dict(objective="deft_cayley")),
    ("mean->p", dict(objective="power:1", objective_schedule="adaptive", schedule_signal="mean",
                     schedule_mode="exponent")),
    ("seq->p", dict(objective="p", objective_schedule="adaptive", schedule_signal="sequence_top1")),
    ("seq->eaft:1", dict(objective="eaft:1", objective_schedule="adaptive", schedule_signal="sequence_top1")),
    ("seq->asft", dict(objective="asft", objective_schedule="adaptive", schedule_signal="sequence_top1")),
    ("seq_clean->p", dict(objective="p", objective_schedule="adaptive", schedule_signal="sequence_top1_clean")),
    # added 2026-12-07, after the rule (3895758) and before any of its runs: a lambda-0 end that is a confidence-aware
    # objective (the issue's own example): EAFT while the model cannot answer (v1: eaft:1 first at mid and strong),
    # p once it can (seq->p ahead of NLL at traj on seed 0); lab field schedule_start_objective
    ("seq:eaft:1->p", dict(objective="p", objective_schedule="adaptive", schedule_signal="sequence_top1",
                           schedule_start_objective="eaft:1")),
    # added 2026-12-07 (fourth sitting), before any of its runs: the third and last design of ours. Where the model never
    # answers within the run a schedule trains its lambda-0 end alone (weak, svamp), and deft_cayley is the one fixed
    # objective not behind at either; p once the model answers, as above
    ("seq:deft_cayley->p", dict(objective="p", objective_schedule="adaptive", schedule_signal="sequence_top1",
                                schedule_start_objective="deft_cayley")),
]
FIXED_V2 = ["nll", "p", "eaft:1", "asft", "deft_cayley"]
# each schedule's two endpoints (lambda 0: NLL or its start objective; lambda 1: its target), for "a schedule ahead of
# both its endpoints"
ENDPOINTS_V2 = {"mean->p": ("nll", "p"), "seq->p": ("nll", "p"), "seq->eaft:1": ("nll", "eaft:1"),
                "seq->asft": ("nll", "asft"), "seq_clean->p": ("nll", "p"), "seq:eaft:1->p": ("eaft:1", "p"),
                "seq:deft_cayley->p": ("deft_cayley", "p")}
# the candidate signals of the signal rule, with the ramp each is read on (its registered one)
SIGNAL_CANDIDATES = ("sequence_top1", "sequence_top1_clean", "token_top1", "mean")
PROBE_CONFIG = dict(objective="p", objective_schedule="adaptive")  # the config the probe advises from (its defaults)
SMOKE_CANDIDATES = ["nll", "p"]
# The ProbSFTConfig fields that say what a candidate trains (after trl_prob resolves it): two candidates with the
# same values train the same thing, so their runs are shared (today's auto and another, or the probe's choice).
KEY_FIELDS = ("objective", "objective_schedule", "schedule_signal", "schedule_mode", "schedule_ramp_low",
              "schedule_ramp_high", "schedule_ema_decay", "schedule_constant_lambda", "schedule_warmup_ratio",
              "ref_model_name_or_path", "schedule_start_objective")  # the last: lab only, absent from core configs
# fields only trl_prob.experimental's config has: a candidate naming one is built with it (the others with the core's,
# so their resolved fields, and their run keys, stay what they were)
LAB_FIELDS = ("schedule_start_objective",)


def config_class(kwargs: dict):
    """``ProbSFTConfig``, or ``ExperimentalSFTConfig`` for a candidate that sets a lab field."""
    if any(k in kwargs for k in LAB_FIELDS):
        from trl_prob.experimental import ExperimentalSFTConfig

        return ExperimentalSFTConfig
    from trl_prob import ProbSFTConfig

    return ProbSFTConfig


def accepted(kwargs: dict) -> bool:
    """trl_prob accepts this candidate: its objective parses and its config class takes the kwargs."""
    from trl_prob.objectives import get_objective

    try:
        if kwargs.get("objective", "nll") != "auto":
            get_objective(kwargs["objective"])
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(open(os.devnull, "w")):
            config_class(kwargs)(output_dir=out, use_cpu=True, bf16=False, report_to="none", **kwargs)
    except Exception:  # noqa: BLE001 - any refusal means "not there yet"
        return False
    return True


def available_candidates(names=None) -> list[tuple[str, dict | None]]:
    """The candidates trl_prob accepts today (``probe`` always), in stage-1 order; ``names`` keeps only those."""
    out = [(n, kw) for n, kw in CANDIDATES if kw is None or accepted(kw)]
    return [c for c in out if names is None or c[0] in names]


def resolved(kwargs: dict) -> str:
    return _resolved(json.dumps(kwargs, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _resolved(kwargs_json: str) -> str:
    """What a candidate trains, after trl_prob resolves it (``auto`` becomes its settings): KEY_FIELDS, as JSON."""
    kwargs = json.loads(kwargs_json)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(open(os.devnull, "w")):
        config = config_class(kwargs)(output_dir=out, use_cpu=True, bf16=False, report_to="none", **kwargs)
    fields = {k: getattr(config, k) for k in KEY_FIELDS if hasattr(config, k)}
    if fields.get("objective_schedule") == "none":
        # a fixed objective's training does not read the schedule fields: pinned to their defaults when the first
        # runs were keyed (token_top1 on 0.30 -> 0.55), so those runs stay shared after the default signal moved
        fields.update(schedule_signal="token_top1", schedule_ramp_low=0.3, schedule_ramp_high=0.55)
    return json.dumps(fields, sort_keys=True, default=str)


def training_of(kwargs: dict) -> str:
    """A short id of what a candidate trains (shared by candidates that resolve alike)."""
    return hashlib.sha1(resolved(kwargs).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def _read(name: str, data_dir: str) -> list[dict]:
    with open(os.path.join(data_dir, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _clean(text: str) -> str:
    return re.sub(r"\s+([.,?!])", r"\1", " ".join(text.split()))


def derive_equation(question: str, answer: str) -> str | None:
    """An equation for a MAWPS problem (the copied files carry only the answer): the first of ``a op b`` over the
    question's numbers (in the order they appear, then reversed; + - * /) whose value is the answer, else the first
    ``a +- b +- c`` (AddSub has a few three-number problems). ``None`` when nothing matches. Where two expressions
    give the answer by coincidence the first is taken: the label can then be the wrong reasoning for the right value
    (rare for SingleOp / AddSub, common for MultiArith, which is therefore not used)."""
    import itertools

    numbers = [m.group().replace(",", "") for m in NUMBER.finditer(question)]
    if any(len(n.partition(".")[2]) > 3 for n in numbers + [answer]):
        return None  # repeating decimals (0.16666666666666666): dozens of tokens, left out
    target = float(answer)

    def hits(expression: str) -> bool:
        value = evaluate_infix(expression)
        return value is not None and abs(value - target) < 1e-6

    pairs = list(itertools.combinations(range(len(numbers)), 2))
    for i, j in pairs + [(j, i) for i, j in pairs]:
        for op in "+-*/":
            expression = f"{numbers[i]} {op} {numbers[j]}"
            if hits(expression):
                return expression
    for i, j, k in itertools.combinations(range(len(numbers)), 3):
        for o1, o2 in itertools.product("+-", repeat=2):
            expression = f"{numbers[i]} {o1} {numbers[j]} {o2} {numbers[k]}"
            if hits(expression):
                return expression
    return None


def load_problems(data_dir: str = DATA_DIR) -> dict[str, list[dict]]:
    """Each file as rows {question, answer (a number string), equation (or None), source}."""
    out = {}
    for name in ("mawps_singleop", "mawps_addsub", "mawps_multiarith"):
        out[name] = []
        for r in _read(f"{name}_test.jsonl", data_dir):
            question, answer = _clean(r["input"]), format_number(r["target"])
            equation = derive_equation(question, answer) if name != "mawps_multiarith" else None
            out[name].append(dict(question=question, answer=answer, equation=equation, source=name))
    out["svamp"] = []
    for r in _read("svamp_test.jsonl", data_dir):
        eq = re.sub(r"(\d+)\.0\b", r"\1", r["Equation"]).strip()
        eq = re.sub(r"^\(\s*(.*?)\s*\)$", r"\1", eq) if eq.count("(") == 1 else eq
        out["svamp"].append(dict(question=_clean(f"{r['Body'].strip()}. {r['Question'].strip()}".replace("..", ".")),
                                 answer=format_number(r["Answer"]), equation=" ".join(eq.split()), source="svamp"))
    return out




def completion_text(row: dict, fmt: str) -> str:
    if fmt == "answer":
        return f"The answer is {row['answer']}."
    if fmt == "equation":  # the expression whose value answers the problem: "290 / 2"
        return row["equation"]
    if fmt == "prefix":  # the same in prefix notation, a format the model has rarely seen: "/ 290 2"
        return to_prefix(row["equation"])
    raise ValueError(f"unknown format {fmt!r}")


def chat_row(row: dict, fmt: str, equation: str | None = None, answer: str | None = None) -> dict:
    target = dict(row)
    if equation is not None:
        target["equation"] = equation
    if answer is not None:
        target["answer"] = answer
    return {"prompt": [{"role": "user", "content": row["question"]}],
            "completion": [{"role": "assistant", "content": completion_text(target, fmt)}]}


def noisy_answer(answer: str, rng: random.Random) -> str:
    """A wrong but plausible answer: the right one moved by 1-10 (never negative, never the right one)."""
    x = float(answer)
    while True:
        y = x + rng.choice([-1, 1]) * rng.randint(1, 10)
        if y >= 0 and y != x:
            return format_number(y)


SWAP = {"+": "-", "-": "+", "*": "/", "/": "*"}


def noisy_equation(equation: str, answer: str, rng: random.Random) -> str:
    """A wrong equation: one operator swapped for its inverse (+ <-> -, * <-> /), the mistake a student makes; when
    that leaves the value unchanged (or cannot be computed), another operator, then an operand moved by 1-10."""
    ops = [i for i, ch in enumerate(equation) if ch in SWAP]
    rng.shuffle(ops)
    for i in ops:
        for op in [SWAP[equation[i]]] + [o for o in "+-*/" if o not in (equation[i], SWAP[equation[i]])]:
            candidate = equation[:i] + op + equation[i + 1 :]
            value = evaluate_infix(candidate)
            if value is not None and abs(value - float(answer)) > 1e-6:
                return candidate
    numbers = list(NUMBER.finditer(equation))
    m = rng.choice(numbers)
    return equation[: m.start()] + noisy_answer(m.group(), rng) + equation[m.end() :]


def noisy_operand(equation: str, question: str, rng: random.Random) -> str | None:
    """A wrong equation a model that reads the question contradicts: one operand replaced by a number the question
    does not contain (the right one moved by 1-10, never negative), so the label asks the model to write a number it
    has nowhere to copy from; the equation's value changes (None when no such operand exists)."""
    given = {float(m.group().replace(",", "")) for m in NUMBER.finditer(question)}
    right = evaluate_infix(equation)
    if right is None:
        return None
    numbers = list(NUMBER.finditer(equation))
    rng.shuffle(numbers)
    for m in numbers:
        for _ in range(20):
            y = noisy_answer(m.group(), rng)
            candidate = equation[: m.start()] + y + equation[m.end() :]
            value = evaluate_infix(candidate)
            if float(y) not in given and value is not None and abs(value - right) > 1e-6:
                return candidate
    return None


# A place: which problems, which format, label noise, and whether the base is first warmed up (NLL, disjoint rows).
# ``noise_kind``: "operator" (default: noisy_equation, an operator swapped) or "operand" (noisy_operand).
EASY = ["mawps_singleop", "mawps_addsub"]
PLACES = {
    "weak": dict(sources=EASY, fmt="prefix", noise=0.0, warmup=False),
    "strong_noise25": dict(sources=EASY, fmt="equation", noise=0.25, warmup=True),
    "mid": dict(sources=EASY, fmt="equation", noise=0.0, warmup=False),
    "strong": dict(sources=EASY, fmt="equation", noise=0.0, warmup=True),
    "svamp": dict(sources=["svamp"], fmt="equation", noise=0.0, warmup=False),
    # trajectory places (issue 34): the base writes under 5% of the answers (prefix notation is new to it), and the
    # run is long enough to go from unable to able: 288 rows, 4 passes = 144 steps (4x the others), held-out
    # teacher-forced exact match on the first `curve_rows` test problems every `curve_every` steps (the run's
    # `curve`); no warm-up rows, the first 400 problems after the training rows are the test set
    "traj": dict(sources=EASY, fmt="prefix", noise=0.0, warmup=False,
                 trajectory=dict(train_rows=288, epochs=4.0, curve_every=36, curve_rows=200, test_rows=400)),
    "traj_noise25": dict(sources=EASY, fmt="prefix", noise=0.25, warmup=False,
                         trajectory=dict(train_rows=288, epochs=4.0, curve_every=36, curve_rows=200, test_rows=400)),
    # the redesign after traj_noise25's pilot (2026-12-07: NLL 0 -> 0.15 -> 0.15 -> 0.28 -> 0.26, still rising at
    # mid-run, so it did not qualify by the committed test): the same rows and noise, twice the passes (288 steps),
    # where NLL has time to fit the wrong labels; its own pilot decides whether it qualifies
    "traj_noise25_long": dict(sources=EASY, fmt="prefix", noise=0.25, warmup=False,
                              trajectory=dict(train_rows=288, epochs=8.0, curve_every=48, curve_rows=200,
                                              test_rows=400)),
    # the second redesign (2026-12-07, fourth sitting; committed before its pilot): traj_noise25_long's NLL fitted its
    # swapped operators (mean p 0.97) and still rose to the end: a swapped operator is a plausible answer to the
    # question. Here 30% of the rows write an operand the question does not contain, a label a model that copies the
    # question's numbers contradicts, and which fitting teaches it to invent numbers; same rows and length (288 steps)
    "traj_noise30_operand_long": dict(sources=EASY, fmt="prefix", noise=0.30, noise_kind="operand", warmup=False,
                                      trajectory=dict(train_rows=288, epochs=8.0, curve_every=48, curve_rows=200,
                                                      test_rows=400)),
}
PLACES_V1 = ["weak", "strong_noise25", "mid", "strong", "svamp"]  # the places of the issue-27 verdict
SMOKE_PLACES = ["weak", "mid"]
MIN_TEST = 400  # every place tests on at least this many problems (all it does not use)
STRONG_MARGIN = 0.05  # a strong base beats the trivial baseline by at least this much exact match


def problem_pool(sources: list[str], problems: dict, split_seed: int) -> list[dict]:
    """The place's problems with a checked equation, each question once, in the fixed order of ``split_seed``."""
    seen, unique = set(), []
    for r in (r for s in sources for r in problems[s]):
        if equation_ok(r) and r["question"] not in seen:  # the same question twice would leak test into train
            seen.add(r["question"])
            unique.append(r)
    random.Random(split_seed).shuffle(unique)
    return unique


def place_args(place: str, args):
    """``args`` as a place reads them: a trajectory place's own training rows, passes and test size (a smoke run keeps
    its tiny sizes and evaluates every step); any other place, ``args`` itself (so its run keys are unchanged)."""
    traj = PLACES[place].get("trajectory")
    if not traj:
        return args
    out = argparse.Namespace(**vars(args))
    if args.smoke:
        out.curve_every, out.curve_rows = 1, min(8, traj["curve_rows"])
    else:
        out.train_rows, out.epochs = traj["train_rows"], traj["epochs"]
        out.test_limit = args.test_limit or traj["test_rows"]
        out.curve_every, out.curve_rows = traj["curve_every"], traj["curve_rows"]
    return out


def place_splits(place: str, args, problems: dict) -> dict:
    """Train / warm-up / test rows of a place, fixed by ``args.split_seed`` (the same for every candidate and seed).
    Places with the same sources share the shuffle: their training rows are the first ``train_rows``, the warm-up base
    of those sources (if any place has one) learns the next ``warmup_rows``, and the test set is every problem left,
    in shuffle order: the four MAWPS places test on the same problems, none of which any of them trains or warms up
    on (``--test_limit`` keeps the first N: smoke runs)."""
    spec = PLACES[place]
    pool = problem_pool(spec["sources"], problems, args.split_seed)
    warmed = any(q["warmup"] and q["sources"] == spec["sources"] for q in PLACES.values())
    if spec.get("trajectory"):
        warmed = False  # a trajectory place trains on rows of its own; no warm-up base
    n_train, n_warm = args.train_rows, args.warmup_rows if warmed else 0
    train, warm = pool[:n_train], pool[n_train : n_train + n_warm]
    test = pool[n_train + n_warm :]
    if args.test_limit:
        test = test[: args.test_limit]
    elif len(test) < MIN_TEST:
        raise ValueError(f"place {place}: {len(test)} test problems left, fewer than {MIN_TEST}")
    rng = random.Random(args.split_seed + 1)
    noisy = set(rng.sample(range(len(train)), round(spec["noise"] * len(train))))
    if spec.get("noise_kind", "operator") == "operand":
        wrong = {i: noisy_operand(train[i]["equation"], train[i]["question"], rng) for i in sorted(noisy)}
        noisy = {i for i, eq in wrong.items() if eq is not None}  # rows with no such operand stay clean (reported)
    else:
        wrong = {i: noisy_equation(train[i]["equation"], train[i]["answer"], rng) for i in sorted(noisy)}
    rows = [chat_row(r, spec["fmt"], equation=wrong[i]) if i in noisy else chat_row(r, spec["fmt"])
            for i, r in enumerate(train)]
    return dict(test=test, train=rows, train_clean=train, warm=[chat_row(r, spec["fmt"]) for r in warm],
                fmt=spec["fmt"], noisy=sorted(noisy))


# ------------------------------------------------------------------------------------------------------------------
# The trivial baseline: the first two numbers of the problem with the place's most common operator
# ------------------------------------------------------------------------------------------------------------------


def most_common_operator(equations: list[str]) -> str:
    """The operator that occurs most often in ``equations`` (ties: the first of + - * /)."""
    counts = collections.Counter(ch for eq in equations for ch in eq if ch in "+-*/")
    return max("+-*/", key=lambda op: counts[op])  # max keeps the first of equal counts


def trivial_prediction(question: str, op: str) -> str | None:
    """``a op b`` for the first two numbers ``a``, ``b`` of the question, as a number string (None: fewer than two
    numbers, or / 0)."""
    numbers = [m.group().replace(",", "") for m in NUMBER.finditer(question)]
    if len(numbers) < 2:
        return None
    value = evaluate_infix(f"{numbers[0]} {op} {numbers[1]}")
    return None if value is None else format_number(round(value, 6))


def trivial_hits(rows: list[dict], op: str) -> list[int]:
    return [int(same_number(trivial_prediction(r["question"], op), r["answer"])) for r in rows]


# ------------------------------------------------------------------------------------------------------------------
# Model, LoRA, evaluation
# ------------------------------------------------------------------------------------------------------------------


def _quiet():
    warnings.filterwarnings("ignore")
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("trl_prob").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()


def lora_config(model_dir: str, args):
    """LoRA on every linear layer of the top ``args.lora_layers`` decoder layers: the backward stops there."""
    from peft import LoraConfig
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    top = min(args.lora_layers, n)
    return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      layers_to_transform=list(range(n - top, n)), layers_pattern="layers")


def load_model(model_dir: str, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)


def steps_for(rows: int, args, epochs: float | None = None) -> int:
    """Optimizer steps for ``epochs`` passes (default ``args.epochs``) over ``rows`` rows at ``args.batch``."""
    return max(1, math.ceil((args.epochs if epochs is None else epochs) * rows / args.batch))


@contextlib.contextmanager
def reading_every_signal():
    """While a trainer is built: ask the fused head for every output the candidate signals read (``log_sum_sq_probs``
    for ``sequence_top1_clean``), so each step's statistics give all of them whatever the run trains. The loss does
    not read the extra output (benchmark only: trajectory places record every signal along the run)."""
    from trl_prob.hook import ObjectiveHook

    original = ObjectiveHook.needs

    def needs(self):
        return {**original(self), "benchmark: candidate signals": ("log_probs", "is_top1", "log_sum_sq_probs")}

    ObjectiveHook.needs = needs
    try:
        yield
    finally:
        ObjectiveHook.needs = original


def make_trainer(model_dir: str, rows: list[dict], args, kwargs: dict, seed: int, out: str, steps: int, lr: float,
                 callbacks=(), eval_rows: list[dict] | None = None, eval_every: int | None = None,
                 every_signal: bool = False):
    """``eval_rows`` / ``eval_every``: evaluate on those rows every ``eval_every`` steps (``eval_exact_match`` in the
    log history: the curve of a trajectory place); ``every_signal``: see :func:`reading_every_signal`."""
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed

    from trl_prob import ProbSFTTrainer

    set_seed(seed)  # the LoRA init happens when the trainer wraps the model, before the Trainer seeds itself
    evaluation = dict(eval_strategy="steps", eval_steps=eval_every) if eval_rows and eval_every else {}
    config = config_class(kwargs)(
        output_dir=out, use_cpu=args.device == "cpu", bf16=False, max_length=args.max_length,
        per_device_train_batch_size=args.batch, per_device_eval_batch_size=32, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=2, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, gradient_checkpointing=False, seed=seed, data_seed=seed,
        dataloader_num_workers=0, schedule_warm_start_samples=min(args.probe_rows, len(rows)), **evaluation,
        **kwargs)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with reading_every_signal() if every_signal else contextlib.nullcontext():
        trainer = ProbSFTTrainer(model=load_model(model_dir, args.device), args=config,
                                 train_dataset=Dataset.from_list(rows),
                                 eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                                 processing_class=tokenizer, peft_config=lora_config(model_dir, args),
                                 callbacks=list(callbacks))  # fmt: skip
    if every_signal:  # and every statistics column each step (a run computes only its own signal's): same training
        from trl_prob.schedules import SIGNALS
        from trl_prob.stats import column_groups

        from common import compute_stats_columns

        columns = column_groups(trainer.objective_hook.stats_columns, *(SIGNALS[n].columns for n in SIGNAL_CANDIDATES))
        compute_stats_columns(trainer, columns)
    return trainer


def signal_values(stats) -> dict:
    """Every candidate signal of the signal rule, read from one set of statistics (NaN: its head output missing)."""
    from trl_prob.schedules import SIGNALS

    return {name: SIGNALS[name].read(stats) for name in SIGNAL_CANDIDATES}


def curve_rows(split: dict, args) -> list[dict]:
    """The held-out rows a trajectory place's curve is measured on: its first ``curve_rows`` test problems, with their
    clean labels in the place's format."""
    return [chat_row(r, split["fmt"]) for r in split["test"][: args.curve_rows]]


def probe_stats(trainer, n: int) -> dict:
    stats = trainer.measure_token_probs(num_samples=n, progress=False)
    return dict(mean_p=stats.mean_p, token_top1=stats.token_top1_share, sequence_top1=stats.sequence_top1_share)


def generate_answers(model, tokenizer, questions: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    import torch

    model.eval()
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=False) for q in questions[start : start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def score(answers: list[str], test: list[dict], fmt: str) -> list[int]:
    """``hits``: 1 where the value of the answer is the clean reference answer, in the order of ``test``."""
    return [int(same_number(predicted_value(a, fmt), r["answer"])) for a, r in zip(answers, test, strict=True)]


def exact_match(model, tokenizer, test: list[dict], args, fmt: str) -> tuple[list[int], list[str]]:
    """Greedy answers to the test problems and their hits, in the test order."""
    answers = generate_answers(model, tokenizer, [r["question"] for r in test], args.eval_batch, args.max_new_tokens)
    return score(answers, test, fmt), answers


# ------------------------------------------------------------------------------------------------------------------
# Places: the base of each (the strong one warmed up once and cached) and its measured placement
# ------------------------------------------------------------------------------------------------------------------


def settings_key(args, *extra) -> str:
    fields = dict(model=args.model, split_seed=args.split_seed, train_rows=args.train_rows, test_limit=args.test_limit,
                  warmup_rows=args.warmup_rows, max_length=args.max_length, lora_r=args.lora_r,
                  lora_layers=args.lora_layers, batch=args.batch, extra=extra)
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]


def base_dir_for(place: str, split: dict, args) -> tuple[str, dict]:
    """The model directory a place trains from, and how it was made. Warm-up places: the model after NLL LoRA on the
    place's disjoint warm-up rows (``--warmup_epochs`` passes at ``--warmup_lr``), merged, then checked on the place's
    clean training rows (never its test rows): if its exact match there does not beat the trivial baseline by
    STRONG_MARGIN, another round of the same warm-up (at most ``--warmup_rounds``). Saved once under
    ``args.cache_dir`` with ``warmup.json`` and reused."""
    spec = PLACES[place]
    if not spec["warmup"]:
        return args.model, {}
    key = settings_key(args, "warmup", spec["fmt"], spec["sources"], args.warmup_epochs, args.warmup_lr,
                       args.warmup_rounds, STRONG_MARGIN)
    path = os.path.join(args.cache_dir, f"warm-{key}")
    if os.path.exists(os.path.join(path, "warmup.json")):
        with open(os.path.join(path, "warmup.json")) as f:
            return path, json.load(f)
    from transformers import AutoTokenizer

    t0, current, rounds = time.time(), args.model, []
    check = split["train_clean"]
    trivial = statistics.fmean(trivial_hits(check, most_common_operator([r["equation"] for r in check])))
    for round_ in range(1, args.warmup_rounds + 1):
        steps = steps_for(len(split["warm"]), args, args.warmup_epochs)
        with tempfile.TemporaryDirectory() as out:
            trainer = make_trainer(current, split["warm"], args, dict(objective="nll"), seed=round_ - 1, out=out,
                                   steps=steps, lr=args.warmup_lr)
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                trainer.train()
            merged = trainer.model.merge_and_unload()
            tmp = path + f".round{round_}.tmp{os.getpid()}"
            merged.save_pretrained(tmp)
            trainer.processing_class.save_pretrained(tmp)
            del trainer, merged
        hits, _ = exact_match(load_model(tmp, args.device), AutoTokenizer.from_pretrained(tmp), check, args,
                              spec["fmt"])
        acc = statistics.fmean(hits)
        rounds.append(dict(round=round_, steps=steps, train_rows_exact_match=acc, train_rows_trivial=trivial))
        print(f"  warm-up base for {place}, round {round_}: {steps} NLL steps on {len(split['warm'])} disjoint rows; "
              f"exact match on the training rows {acc:.3f} vs trivial {trivial:.3f} ({time.time() - t0:.0f} s)",
              flush=True)
        if current != args.model:
            import shutil

            shutil.rmtree(current)
        current = tmp
        if acc >= trivial + STRONG_MARGIN:
            break
    info = dict(rounds=rounds, warmup_rows=len(split["warm"]), warmup_epochs=args.warmup_epochs,
                warmup_lr=args.warmup_lr, seconds=round(time.time() - t0, 1))
    with open(os.path.join(current, "warmup.json"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(current, path)
    return path, info


REBUILT_PROBE_TOLERANCE = 1e-4  # probe mean p / token_top1 of a rebuilt base that measures as the recorded one


def check_same_base(place: str, recorded: dict, fresh: dict, out: str) -> dict | None:
    """Refuse to add runs to a place whose base, built again here, is not the one its recorded runs trained from.

    A warm-up base is rebuilt on each new machine, and floating point differs between CPUs: the same steps can give
    another base (another place on the continuum). Runs of two bases must not be averaged as seeds of one. A rebuilt
    base whose weights differ is accepted as the recorded one only when it measures the same: the same hit or miss on
    every test problem and probe mean p and token_top1 within REBUILT_PROBE_TOLERANCE (weights that differ by CPU
    rounding, not by place). Returns None for the very base, the rebuild's record for an accepted one (kept beside the
    place as ``rebuilt_bases`` and on each run as ``base_rebuilt_sha256``: disclosed, never silent)."""
    if recorded.get("base_sha256") == fresh["base_sha256"]:
        return None
    same = recorded.get("base_hits") == fresh["base_hits"] and all(
        abs(recorded["probe"][k] - fresh["probe"][k]) <= REBUILT_PROBE_TOLERANCE for k in ("mean_p", "token_top1"))
    if not same:
        raise SystemExit(
            f"real_continuum: place {place}: the base built here (exact match {fresh['base_exact_match']:.3f}, "
            f"probe mean p {fresh['probe']['mean_p']:.4f}) is not the base of the runs in {out} (exact match "
            f"{recorded.get('base_exact_match', float('nan')):.3f}, mean p {recorded['probe']['mean_p']:.4f}); write "
            f"these runs to another --out, or point --cache_dir at the original base")
    return dict(base_sha256=fresh["base_sha256"], base_exact_match=fresh["base_exact_match"], probe=fresh["probe"],
                hits_identical=True, warmup_base=fresh.get("warmup_base"),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def probe_recommendation(base_dir: str, split: dict, args) -> dict:
    """What the probe recommends for this base on the place's training rows, by the paper's rule as the probe computes
    it (``recommended_objective`` / ``recommended_schedule`` of trl_prob.probe.run_probe, on a trainer configured as
    PROBE_CONFIG; ``auto`` is a candidate of its own): the candidate ``probe`` trains exactly that."""
    from trl_prob.probe import run_probe

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(base_dir, split["train"], args, PROBE_CONFIG, seed=0, out=out, steps=1, lr=0.0)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            report = run_probe(trainer, num_samples=min(args.probe_rows, len(split["train"])), output_dir=None,
                               progress=False)
        signals = getattr(report, "signals", {}) or {}
        if "token_top1" in signals:
            stats = dict(mean_p=report.mean_p, token_top1=signals["token_top1"],
                         sequence_top1=signals.get("sequence_top1"))
        else:
            stats = probe_stats(trainer, args.probe_rows)
        del trainer
    kwargs = dict(objective=report.recommended_objective)
    if report.recommended_schedule != "none":
        kwargs["objective_schedule"] = report.recommended_schedule
    return dict(stats=stats, kwargs=kwargs, flags=report.recommended_flags, continuum=report.continuum)


def measure_start(place: str, split: dict, base_dir: str, args) -> dict:
    """What every candidate signal reads on the base before step 1 (the adaptive schedule's warm start: the place's
    first ``probe_rows`` training rows), the lambda each gives on its own ramp, and, at a trajectory place, the base's
    held-out teacher-forced exact match on the curve rows (the curve's step 0)."""
    from trl_prob.schedules import SIGNALS, adaptive_lambda

    t0 = time.time()
    trajectory = bool(PLACES[place].get("trajectory"))
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(base_dir, split["train"], args, dict(objective="nll"), seed=0, out=out, steps=1, lr=0.0,
                               eval_rows=curve_rows(split, args) if trajectory else None, every_signal=True)
        stats = trainer.measure_token_probs(num_samples=min(args.probe_rows, len(split["train"])), progress=False)
        values = signal_values(stats)
        info = dict(signals={k: (None if math.isnan(v) else v) for k, v in values.items()},
                    lambda_at_start={k: (None if math.isnan(v) else adaptive_lambda(v, *SIGNALS[k].ramp))
                                     for k, v in values.items()})  # fmt: skip
        if trajectory:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                info["curve_exact_match"] = trainer.evaluate()["eval_exact_match"]
        del trainer
    info["seconds"] = round(time.time() - t0, 1)
    lam = ", ".join(f"{k} {v:.3f} (lambda {info['lambda_at_start'][k]:.2f})" for k, v in values.items()
                    if not math.isnan(v))
    print(f"  place {place:15s} signals at step 1: {lam}" + (f"; held-out exact match at step 0 (teacher-forced, "
          f"{args.curve_rows} rows) {info['curve_exact_match']:.3f}" if trajectory else ""), flush=True)
    return info


def measure_place(place: str, split: dict, base_dir: str, warmup: dict, args) -> dict:
    from transformers import AutoTokenizer

    t0 = time.time()
    rec = probe_recommendation(base_dir, split, args)
    hits, answers = exact_match(load_model(base_dir, args.device), AutoTokenizer.from_pretrained(base_dir),
                                split["test"], args, split["fmt"])
    op = most_common_operator([r["equation"] for r in split["train_clean"]])
    trivial = trivial_hits(split["test"], op)
    base_em, trivial_em = statistics.fmean(hits), statistics.fmean(trivial)
    info = dict(place=place, **PLACES[place], base_dir=base_dir, probe=rec["stats"], probe_recommends=rec["kwargs"],
                probe_flags=rec["flags"], probe_continuum=rec["continuum"], base_exact_match=base_em,
                trivial_baseline=trivial_em, trivial_operator=op, base_hits=hits,
                base_vs_trivial=paired_difference(hits, trivial), warmup_base=warmup,
                strong_enough=(base_em >= trivial_em + STRONG_MARGIN) if PLACES[place]["warmup"] else None,
                test_rows=len(split["test"]), train_rows=len(split["train"]), noisy_rows=len(split["noisy"]),
                first_answers=answers[:3], seconds=round(time.time() - t0, 1))
    print(f"  place {place:15s} probe mean p {rec['stats']['mean_p']:.3f} token_top1 {rec['stats']['token_top1']:.3f}"
          f" | base exact match {base_em:.3f}, trivial ({op}) {trivial_em:.3f} on {len(split['test'])} | probe "
          f"recommends {rec['flags']} ({info['seconds']:.0f} s)", flush=True)
    return info


# ------------------------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------------------------


def run_one(place: str, split: dict, base_dir: str, name: str, kwargs: dict, seed: int, args) -> dict:
    from transformers import TrainerCallback

    t0 = time.time()
    lambdas = []
    trajectory = bool(PLACES[place].get("trajectory"))
    trace = collections.defaultdict(list)  # trajectory places: every candidate signal, per step (before its update)

    class RecordLambda(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            lambdas.append(float(trainer.objective_hook.objective_lambda))
            stats = trainer.objective_hook.step_stats  # this step's, before the schedule's callback consumes them
            if trajectory and stats is not None:
                for signal, value in signal_values(stats.to_host()).items():
                    trace[signal].append(None if math.isnan(value) else round(value, 5))

    steps = steps_for(len(split["train"]), args)
    evaluation = dict(eval_rows=curve_rows(split, args), eval_every=args.curve_every, every_signal=True) if trajectory else {}
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(base_dir, split["train"], args, kwargs, seed, out, steps, args.lr,
                               callbacks=[RecordLambda()], **evaluation)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            trainer.train()
        trained = time.time() - t0
        after = probe_stats(trainer, args.probe_rows)
        hits, answers = exact_match(trainer.model, trainer.processing_class, split["test"], args, split["fmt"])
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        curve = [dict(step=e["step"], exact_match=e["eval_exact_match"]) for e in trainer.state.log_history
                 if "eval_exact_match" in e]
    scheduled = kwargs.get("objective_schedule", "none") != "none" or kwargs.get("objective") == "auto"
    extra = {}
    if trajectory:
        start = args.place_info[place]["start"]
        extra = dict(curve=[dict(step=0, exact_match=start["curve_exact_match"])] + curve, signal_trace=dict(trace),
                     curve_rows=args.curve_rows)
    return dict(place=place, objective=name, training=training_of(kwargs), seed=seed, config=kwargs,
                resolved=json.loads(resolved(kwargs)), test_acc=statistics.fmean(hits), hits=hits,
                mean_p_after=after["mean_p"], token_top1_after=after["token_top1"],
                lambda_path=lambdas if scheduled else None, steps=steps, lr=args.lr,
                loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                first_answers=answers[:3], train_seconds=round(trained, 1), seconds=round(time.time() - t0, 1),
                key=run_key(place, kwargs, seed, args), **extra)  # fmt: skip


def run_key(place, kwargs, seed, args) -> str:
    return f"{place}|{training_of(kwargs)}|{seed}|" + settings_key(args, args.epochs, args.lr, args.max_new_tokens,
                                                                   args.place_info[place]["base_sha256"])


# ------------------------------------------------------------------------------------------------------------------
# The rule (benchmarks/README.md, "Real-model continuum": committed before any run)
# ------------------------------------------------------------------------------------------------------------------


def place_table(cell: dict, fixed=FIXED) -> dict:
    """One place: ``cell[candidate][seed]`` = hits (0/1 per test problem, in the place's test order).

    Each candidate's exact match is the mean over its seeds; the best fixed objective is the fixed candidate with the
    highest (ties: the first in ``fixed``). A candidate's difference from it is paired per problem: the candidate's
    hits averaged over its seeds minus the best fixed objective's averaged over its own, with the s.e. of that mean
    over problems; *behind* below -1 s.e., *ahead* above +1 s.e. The seed spread (stdev of exact match over seeds)
    is reported beside it."""
    rows = {}
    for c, by_seed in cell.items():
        accs = [statistics.fmean(by_seed[s]) for s in sorted(by_seed)]
        m, se = mean_se(accs)
        rows[c] = dict(mean=m, seed_se=se, seed_sd=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                       seeds=sorted(by_seed), accs=accs, hits=mean_over_seeds([by_seed[s] for s in sorted(by_seed)]))
    present = [f for f in fixed if f in rows]
    if not present:
        raise ValueError("no fixed objective at this place")
    best = max(present, key=lambda f: (rows[f]["mean"], -present.index(f)))
    ranks = average_ranks({c: r["mean"] for c, r in rows.items()})
    for c, r in rows.items():
        d = paired_difference(r["hits"], rows[best]["hits"])
        r.update(diff=d["mean"], diff_se=d["se"], standing=standing(d["mean"], d["se"]),
                 within_two_se=bool(d["mean"] >= -2 * d["se"]), rank=ranks[c])
    return dict(best_fixed=best, candidates=rows)


def stage_two(cell: dict, fixed=FIXED, seed: int = 0) -> list[str]:
    """The candidates that get seeds 1 and 2 at a place: within two s.e. of the best fixed objective (or ahead of it),
    paired per problem on ``seed`` (stage 1) alone."""
    first = {c: {seed: by_seed[seed]} for c, by_seed in cell.items() if seed in by_seed}
    table = place_table(first, fixed)
    return [c for c, r in table["candidates"].items() if r["within_two_se"]]


def rule_tables(cells: dict, candidates: list[str], fixed, table) -> tuple[dict, list, dict, list]:
    """What v1 and v2 share: per place ``table(cell)``, the places where every candidate has run, each candidate's
    places behind / ahead and ranks there, and the ranking (fewest behind, most ahead, mean rank)."""
    tables, complete = {}, []
    for place, cell in cells.items():
        cell = {c: s for c, s in cell.items() if s}
        if not any(f in cell for f in fixed):
            continue
        tables[place] = table(cell)
        if all(c in cell for c in candidates):
            complete.append(place)
    per = {c: dict(behind=[], ahead=[], ranks=[]) for c in candidates}
    for place in complete:
        for c in candidates:
            r = tables[place]["candidates"][c]
            if r["standing"] != "level":
                per[c][r["standing"]].append(place)
            per[c]["ranks"].append(r["rank"])
    for c in candidates:
        per[c]["mean_rank"] = statistics.fmean(per[c]["ranks"]) if per[c]["ranks"] else None
    return tables, complete, per, rank_by_rule(per) if complete else []


def apply_rule(cells: dict, candidates: list[str], fixed=FIXED) -> dict:
    """Over places (``cells[place][candidate][seed]`` = hits): per place :func:`place_table`; a place enters the rule
    once every candidate has run there (others are reported, outside the verdict). Candidates are ranked by fewest
    places behind, then most places ahead, then mean rank of exact match at the places (1 = best, ties averaged).
    ``auto`` becomes the first of that ranking: the first candidate never behind if there is one, else the one
    behind in the fewest places."""
    tables, complete, per, ranking = rule_tables(cells, candidates, fixed, lambda cell: place_table(cell, fixed))
    never_behind = [c for c in ranking if not per[c]["behind"]]
    return dict(tables=tables, places_in_rule=complete, per=per, ranking=ranking, never_behind=never_behind,
                auto=ranking[0] if ranking else None)


def cells_from_runs(runs: list[dict], place_candidates: dict) -> dict:
    """``{place: {candidate: {seed: hits}}}``: a candidate's runs are those of what it trains at the place (runs are
    shared by candidates that resolve alike, e.g. ``probe`` and the candidate whose settings it recommends)."""
    cells = {}
    for place, names in place_candidates.items():
        by_training = collections.defaultdict(dict)
        for r in runs:
            if r["place"] == place:
                by_training[r["training"]][r["seed"]] = r["hits"]
        cells[place] = {name: dict(by_training.get(training, {})) for name, training in names.items()}
    return cells


# ------------------------------------------------------------------------------------------------------------------
# v2 (issue 34): the rule committed in benchmarks/README.md before its first run
# ------------------------------------------------------------------------------------------------------------------

BEHIND_SE = 2.0  # v2 reads "behind" / "ahead" at 2 s.e. of the combined error (the nearest other reading: 1 s.e.)
CONTENTION_SE = 3.0  # stage 2: seeds 1 and 2 for a candidate not behind the best fixed by more than this on seed 0
WARM_START_MAX = 0.2  # a signal's warm-start lambda at a place whose base writes under 5% of the answers
WEAK_BASE_EXACT = 0.05


def seed_accs(by_seed: dict) -> list[float]:
    return [statistics.fmean(by_seed[s]) for s in sorted(by_seed)]


def combined_difference(a: dict, b: dict) -> dict:
    """``a - b`` at one place, ``a`` and ``b`` each ``{seed: hits}``: the paired per-problem difference of hits
    averaged over each one's seeds, with a standard error that counts both the problems and the seed-to-seed spread:
    se = sqrt(se_problems^2 + sd_a^2 / n_a + sd_b^2 / n_b), sd the stdev of exact match over seeds (0 with one
    seed: then only the problems are counted, and the reading says so by its seed count)."""
    accs_a, accs_b = seed_accs(a), seed_accs(b)
    d = paired_difference(mean_over_seeds([a[s] for s in sorted(a)]), mean_over_seeds([b[s] for s in sorted(b)]))
    var_seeds = sum(statistics.variance(x) / len(x) for x in (accs_a, accs_b) if len(x) > 1)
    return dict(mean=d["mean"], se_problems=d["se"], se_seeds=math.sqrt(var_seeds),
                se=math.sqrt(d["se"] ** 2 + var_seeds))


def place_table_v2(cell: dict, fixed=FIXED_V2, k: float = BEHIND_SE) -> dict:
    """One place, ``cell[candidate][seed]`` = hits. The best fixed objective: highest exact match averaged over its
    seeds (ties: first in ``fixed``). Each candidate against it: :func:`combined_difference`, *behind* below -k s.e.,
    *ahead* above +k s.e.; each schedule also against its two endpoints (ENDPOINTS_V2)."""
    rows = {}
    for c, by_seed in cell.items():
        accs = seed_accs(by_seed)
        rows[c] = dict(mean=statistics.fmean(accs), seeds=sorted(by_seed), accs=accs,
                       seed_sd=statistics.stdev(accs) if len(accs) > 1 else 0.0)
    present = [f for f in fixed if f in rows]
    if not present:
        raise ValueError("no fixed objective at this place")
    best = max(present, key=lambda f: (rows[f]["mean"], -present.index(f)))
    ranks = average_ranks({c: r["mean"] for c, r in rows.items()})
    for c, r in rows.items():
        d = combined_difference(cell[c], cell[best]) if c != best else dict(mean=0.0, se=0.0, se_problems=0.0,
                                                                                se_seeds=0.0)
        r.update(diff=d["mean"], diff_se=d["se"], se_problems=d["se_problems"], se_seeds=d["se_seeds"],
                 standing=standing(d["mean"], d["se"], k), rank=ranks[c])
        if c in ENDPOINTS_V2 and all(e in cell for e in ENDPOINTS_V2[c]):
            vs = {e: combined_difference(cell[c], cell[e]) for e in ENDPOINTS_V2[c]}
            r["vs_endpoints"] = {e: dict(diff=v["mean"], se=v["se"], standing=standing(v["mean"], v["se"], k))
                                 for e, v in vs.items()}
            r["ahead_of_both_endpoints"] = all(v["standing"] == "ahead" for v in r["vs_endpoints"].values())
    return dict(best_fixed=best, candidates=rows)


def in_contention(cell: dict, fixed=FIXED_V2, seed: int = 0) -> list[str]:
    """Stage 2 of v2: the candidates that get seeds 1 and 2 at a place: on ``seed`` alone, not behind the best fixed
    objective by more than CONTENTION_SE s.e. over problems (the seed spread is not measured yet, so a wider band)."""
    first = {c: {seed: by_seed[seed]} for c, by_seed in cell.items() if seed in by_seed}
    table = place_table_v2(first, fixed, CONTENTION_SE)
    return [c for c, r in table["candidates"].items() if r["standing"] != "behind"]


def apply_rule_v2(cells: dict, candidates: list[str], fixed=FIXED_V2, k: float = BEHIND_SE,
                  seed0_only: bool = False, qualified=None) -> dict:
    """Over places: per place :func:`place_table_v2`; a place enters once every candidate has a run there. Ranking
    as v1 (fewest places behind, most ahead, mean rank); ``auto`` = the first. ``seed0_only``: the same on seed 0
    alone (a reading reported beside the verdict). The goal: ``auto`` never behind, and at a trajectory place a
    schedule ahead of both its endpoints."""
    if seed0_only:
        cells = {p: {c: {0: s[0]} for c, s in cell.items() if 0 in s} for p, cell in cells.items()}
    tables, complete, per, ranking = rule_tables(cells, candidates, fixed, lambda cell: place_table_v2(cell, fixed, k))
    # trajectory places whose pilot qualified (``qualified``: by :func:`qualifies`; None: every trajectory place)
    trajectory = [p for p in complete if PLACES.get(p, {}).get("trajectory") and (qualified is None or p in qualified)]
    schedules_ahead = {p: [c for c, r in tables[p]["candidates"].items() if r.get("ahead_of_both_endpoints")]
                       for p in trajectory}
    auto = ranking[0] if ranking else None
    return dict(tables=tables, places_in_rule=complete, per=per, ranking=ranking,
                never_behind=[c for c in ranking if not per[c]["behind"]], auto=auto,
                goal=dict(auto_never_behind=bool(auto and not per[auto]["behind"]),
                          schedule_ahead_of_both_endpoints=schedules_ahead,
                          met=bool(auto and not per[auto]["behind"] and any(schedules_ahead.values()))))


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant or n < 3."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    rx = average_ranks(dict(enumerate(x)))
    ry = average_ranks(dict(enumerate(y)))
    a, b = [rx[i] for i in range(len(x))], [ry[i] for i in range(len(y))]
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    cov = sum((u - ma) * (v - mb) for u, v in zip(a, b))
    return cov / math.sqrt(sum((u - ma) ** 2 for u in a) * sum((v - mb) ** 2 for v in b))


def signal_ema_at(trace: list, start: float | None, steps: list[int], decay: float = 0.9) -> list[float]:
    """The schedule's moving average of a signal (decay 0.9, warm-started from ``start``, NaN steps skipped) after
    each of ``steps`` steps (step 0: the warm start itself)."""
    ema, out, values = start, {}, [math.nan if v is None else v for v in trace]
    out[0] = math.nan if ema is None else ema
    for i, v in enumerate(values, 1):
        if not math.isnan(v):
            ema = v if ema is None or math.isnan(ema) else decay * ema + (1 - decay) * v
        out[i] = math.nan if ema is None else ema
    return [out.get(s, math.nan) for s in steps]


def signal_rule(place_info: dict, runs: list[dict]) -> dict:
    """The signal rule (committed before the pilot): a candidate signal is eligible if its warm-start lambda is at
    most WARM_START_MAX at every measured place whose base writes under WEAK_BASE_EXACT of the answers; among the
    eligible, the highest mean Spearman correlation, over the runs at trajectory places, between the signal's moving
    average at the curve's steps and held-out exact match there. Ties within 0.05: sequence_top1 (the shipped
    default, fewer head outputs)."""
    out = {}
    for signal in SIGNAL_CANDIDATES:
        weak = {p: i["start"]["lambda_at_start"].get(signal) for p, i in place_info.items()
                if "start" in i and i.get("base_exact_match", 1.0) < WEAK_BASE_EXACT}
        eligible = bool(weak) and all(v is not None and v <= WARM_START_MAX for v in weak.values())
        rhos = {}
        for r in runs:
            if "curve" not in r or signal not in r.get("signal_trace", {}):
                continue
            steps = [c["step"] for c in r["curve"]]
            start = place_info[r["place"]]["start"]["signals"].get(signal)
            ema = signal_ema_at(r["signal_trace"][signal], start, steps)
            rhos[f"{r['place']}|{r['objective']}|{r['seed']}"] = spearman(ema, [c["exact_match"] for c in r["curve"]])
        finite = [v for v in rhos.values() if not math.isnan(v)]
        out[signal] = dict(warm_start_lambda_at_weak_places=weak, eligible=eligible, spearman=rhos,
                           mean_spearman=statistics.fmean(finite) if finite else None)
    scored = [s for s in SIGNAL_CANDIDATES if out[s]["eligible"] and out[s]["mean_spearman"] is not None]
    best = max(scored, key=lambda s: out[s]["mean_spearman"]) if scored else None
    if best and "sequence_top1" in scored and out["sequence_top1"]["mean_spearman"] >= out[best]["mean_spearman"] - 0.05:
        best = "sequence_top1"
    return dict(signals=out, chosen=best)


def qualifies(place: str, runs: list[dict]) -> dict:
    """The pilot's test of a trajectory place (committed before it ran): NLL's held-out curve (seed 0) starts under
    0.05 and rises by at least 0.15; with label noise it also stalls or falls late: its last point is no more than
    0.02 above its point at mid-run."""
    curve = next((r["curve"] for r in runs if r["place"] == place and r["objective"] == "nll" and r["seed"] == 0
                  and "curve" in r), None)
    if curve is None:
        return dict(qualifies=None, why="no NLL run with a curve yet")
    values = [c["exact_match"] for c in curve]
    rises = values[0] < 0.05 and max(values) >= values[0] + 0.15
    mid = values[len(values) // 2]
    stalls = values[-1] <= mid + 0.02
    noisy = PLACES[place]["noise"] > 0
    ok = rises and (stalls if noisy else True)
    return dict(qualifies=ok, start=values[0], max=max(values), mid=mid, last=values[-1], rises=rises,
                stalls_late=stalls if noisy else None)


def cells_v2(runs: list[dict], places) -> dict:
    """``{place: {candidate: {seed: hits}}}`` for the v2 candidates (runs shared by what they train)."""
    names = {n: training_of(kw) for n, kw in CANDIDATES_V2 if accepted(kw)}
    return cells_from_runs(runs, {p: names for p in places})


def verdict_v2(runs: list[dict], place_info: dict, places) -> dict:
    """The v2 verdict and the readings beside it (1 s.e., seed 0 alone), the signal rule and the pilot's tests."""
    places = [p for p in places if p in place_info]
    names = [n for n, kw in CANDIDATES_V2 if accepted(kw)]
    cells = cells_v2(runs, places)
    pilot = {p: qualifies(p, runs) for p in places if PLACES[p].get("trajectory")}
    qualified = [p for p, q in pilot.items() if q["qualifies"]]
    main_reading = apply_rule_v2(cells, names, qualified=qualified)
    readings = {"1 s.e.": apply_rule_v2(cells, names, k=1.0, qualified=qualified),
                "seed 0 alone": apply_rule_v2(cells, names, seed0_only=True, qualified=qualified)}
    return dict(verdict=main_reading, readings={k: dict(auto=v["auto"], ranking=v["ranking"],
                                                        per={c: {x: y for x, y in d.items() if x != "ranks"}
                                                             for c, d in v["per"].items()})
                                                for k, v in readings.items()},
                signal_rule=signal_rule(place_info, runs), pilot=pilot)


def format_summary(verdict: dict, place_info: dict) -> str:
    lines = []
    for place, t in verdict["tables"].items():
        info = place_info.get(place, {})
        probe = info.get("probe", {})
        lines.append(f"{place}: probe mean p {probe.get('mean_p', float('nan')):.3f} token_top1 "
                     f"{probe.get('token_top1', float('nan')):.3f}; base {info.get('base_exact_match', float('nan')):.3f}"
                     f", trivial {info.get('trivial_baseline', float('nan')):.3f}; best fixed {t['best_fixed']}"
                     + ("" if place in verdict["places_in_rule"] else " (incomplete: outside the rule)"))
        for c, r in sorted(t["candidates"].items(), key=lambda kv: -kv[1]["mean"]):
            lines.append(f"    {c:22s} {r['mean']:.3f} (seeds {len(r['seeds'])}, spread {r['seed_sd']:.3f}) "
                         f"vs best {r['diff']:+.3f} ± {r['diff_se']:.3f} {r['standing']}")
    lines.append("")
    lines.append(f"ranking over {verdict['places_in_rule']} (fewest behind, most ahead, mean rank):")
    for i, c in enumerate(verdict["ranking"], 1):
        v = verdict["per"][c]
        lines.append(f"  {i:2d}. {c:22s} behind {v['behind']} | ahead {v['ahead']} | mean rank {v['mean_rank']:.2f}")
    lines.append(f"never behind: {verdict['never_behind']}; auto by the rule: {verdict['auto']}")
    return "\n".join(lines)


def format_markdown(verdict: dict, place_info: dict) -> str:
    lines = ["| place | probe mean p / top1 | base / trivial | candidate | seeds | exact match | vs best fixed "
             "(paired ± s.e.) | seed spread | standing |", "|---|---|---|---|---|---|---|---|---|"]
    for place, t in verdict["tables"].items():
        info = place_info.get(place, {})
        probe = info.get("probe", {})
        for i, (c, r) in enumerate(sorted(t["candidates"].items(), key=lambda kv: -kv[1]["mean"])):
            head = (f"| {place} | {probe.get('mean_p', float('nan')):.3f} / {probe.get('token_top1', float('nan')):.3f}"
                    f" | {info.get('base_exact_match', float('nan')):.3f} / {info.get('trivial_baseline', float('nan')):.3f} |"
                    ) if i == 0 else "| | | |"
            name = f"**{c}**" if c == t["best_fixed"] else c
            lines.append(f"{head} {name} | {len(r['seeds'])} | {r['mean']:.3f} | {r['diff']:+.3f} ± {r['diff_se']:.3f}"
                         f" | {r['seed_sd']:.3f} | {r['standing']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--design", choices=["v1", "v2"], default="v2",
                        help="v2 (issue 34): 7 places, CANDIDATES_V2, the rule a single seed cannot flip; v1: the "
                             "issue-27 benchmark of record as it ran (5 places, CANDIDATES)")
    parser.add_argument("--smoke", action="store_true",
                        help="2 places, 2 candidates, 8 training rows, 1 pass, 8 test problems, 1 seed (< 3 min)")
    parser.add_argument("--places", nargs="+", default=None, choices=list(PLACES))
    parser.add_argument("--only", nargs="+", default=None, help="candidate names to run (default: all accepted)")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=2, help="1: seed 0 only; 2: then --seeds (1 and 2)")
    parser.add_argument("--seeds", nargs="+", type=int, choices=[1, 2], default=[1, 2],
                        help="the seeds stage 2 (and --check) runs: two workers can split one candidate's seeds "
                             "(--seeds 1 / --seeds 2); the rule reads whatever seeds the runs hold")
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the training rows (every run)")
    parser.add_argument("--lr", type=float, default=1e-3, help="one learning rate for every candidate and place")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train_rows", type=int, default=96, help="training rows per place")
    parser.add_argument("--test_limit", type=int, default=0, help="keep the first N test problems (smoke runs only)")
    parser.add_argument("--warmup_rows", type=int, default=397, help="disjoint rows the strong base warms up on")
    parser.add_argument("--warmup_epochs", type=float, default=3.0)
    parser.add_argument("--warmup_rounds", type=int, default=3, help="warm-up rounds at most, until strong enough")
    parser.add_argument("--warmup_lr", type=float, default=1e-3)
    parser.add_argument("--probe_rows", type=int, default=96)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--max_new_tokens", type=int, default=20, help="greedy tokens per answer")
    parser.add_argument("--eval_batch", type=int, default=100)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_layers", type=int, default=6, help="LoRA on the top N decoder layers only")
    parser.add_argument("--split_seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: this machine's 2 cores are shared; 2 is faster on idle cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data_dir", default=DATA_DIR)
    parser.add_argument("--cache_dir", default=None, help="where warm-up bases are kept")
    parser.add_argument("--out", default=None)
    parser.add_argument("--summary_only", action="store_true", help="train nothing: apply the rule to the JSON")
    parser.add_argument("--absorb", nargs="+", default=[],
                        help="result files of other workers (e.g. one run with --places mid svamp --out B.json): "
                             "their places and runs join --out before anything else happens")
    parser.add_argument("--check", nargs="+", default=[], metavar="CANDIDATE",
                        help="after the verdict: seeds 1 and 2 for these candidates at every place in --places, "
                             "whatever their stage-1 standing; a check reported beside the verdict, so it needs an "
                             "--out of its own (absorb the verdict's file into it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.places = args.places or SMOKE_PLACES
        args.only = args.only or SMOKE_CANDIDATES
        args.stage, args.train_rows, args.epochs = 1, 8, 1.0
        args.test_limit, args.probe_rows, args.eval_batch = args.test_limit or 8, 8, 8
        args.out = args.out or os.path.join(tempfile.gettempdir(), "real_continuum_smoke.json")
    args.places = args.places or (list(PLACES) if args.design == "v2" else PLACES_V1)
    if args.check and args.out in (None, OUT):
        parser.error(f"--check adds runs the rule did not ask for: write them to their own --out, not {OUT}")
    args.out = args.out or OUT
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    _quiet()
    if args.model is None:
        args.model = smollm2_dir()
        args.cache_dir = args.cache_dir or os.path.join(cache_dir(), "real_continuum")
    args.cache_dir = args.cache_dir or os.path.join(tempfile.gettempdir(), "trl-prob-real-continuum")
    if args.design == "v2":
        import trl_prob.experimental  # noqa: F401  (registers sequence_top1_clean, the signal of seq_clean->p)

        candidates = [(n, kw) for n, kw in CANDIDATES_V2 if accepted(kw) and (args.only is None or n in args.only)]
        if args.only:  # stage 1 runs them in the order given (a schedule next to its endpoints)
            candidates.sort(key=lambda c: args.only.index(c[0]))
    else:
        candidates = available_candidates(args.only)
    names = [n for n, _ in candidates]
    unknown = [c for c in args.check if c not in names]
    if unknown:
        raise SystemExit(f"real_continuum: --check {' '.join(unknown)}: not a candidate here; candidates: "
                         f"{', '.join(names)}")
    print(f"candidates: {', '.join(names)}; places: {', '.join(args.places)}; {args.epochs:g} passes over "
          f"{args.train_rows} rows at batch {args.batch}, lr {args.lr}, LoRA r={args.lora_r} on the top "
          f"{args.lora_layers} layers; {args.device}", flush=True)

    log = RunLog(args.out)
    record = log.record
    args.place_info = record.setdefault("places", {})
    for other in args.absorb:
        absorb(log, other)
    problems = load_problems(args.data_dir)
    t_start = time.time()
    prepared, rebuilt_sha = {}, {}  # rebuilt_sha: places whose base here is an accepted rebuild (check_same_base)

    def prepare(place):
        if place not in prepared:
            pargs = place_args(place, args)
            split = place_splits(place, pargs, problems)
            base_dir, warmup = base_dir_for(place, split, pargs)
            pkey = settings_key(pargs, "place", place, PLACES[place], args.max_new_tokens, base_dir, PROBE_CONFIG)
            sha, info = weights_sha256(base_dir), args.place_info.get(place, {})
            accepted = [b["base_sha256"] for b in info.get("rebuilt_bases", [])] if info.get("key") == pkey else []
            if (info.get("key") != pkey or info.get("base_sha256") != sha) and sha not in accepted:
                fresh = dict(measure_place(place, split, base_dir, warmup, pargs), key=pkey, base_sha256=sha)
                rebuilt = None
                if info.get("key") == pkey and any(r["place"] == place for r in log.runs):
                    rebuilt = check_same_base(place, info, fresh, args.out)
                if rebuilt:  # measured the same: its runs join the recorded base's, each marked with its base
                    info.setdefault("rebuilt_bases", []).append(rebuilt)
                    print(f"  place {place}: base rebuilt here (sha256 {sha}, recorded {info['base_sha256']}): the "
                          f"same hit on all {len(fresh['base_hits'])} test problems, probe within "
                          f"{REBUILT_PROBE_TOLERANCE:g}: its runs join the recorded ones, marked", flush=True)
                else:
                    args.place_info[place] = fresh
                log.save()
            if sha != args.place_info[place]["base_sha256"]:
                rebuilt_sha[place] = sha
            if args.design == "v2" and "start" not in args.place_info[place]:  # the signals at step 1 (issue 34)
                args.place_info[place]["start"] = measure_start(place, split, base_dir, pargs)
                log.save()
            kwargs = {n: (probe_kwargs(args.place_info[place]["probe_recommends"]) if kw is None else kw)
                      for n, kw in candidates}
            prepared[place] = split, base_dir, kwargs, pargs
        return prepared[place]

    def run(place, name, seed):
        split, base_dir, kwargs, pargs = prepare(place)
        key = run_key(place, kwargs[name], seed, pargs)
        if key in log:
            return
        try:
            r = run_one(place, split, base_dir, name, kwargs[name], seed, pargs)
        except Exception as e:  # noqa: BLE001 - one candidate failing (e.g. one trl_prob cannot train yet) is reported
            failed = dict(place=place, objective=name, seed=seed, config=kwargs[name], error=repr(e)[:500],
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            log.record.setdefault("failed", []).append(failed)
            log.save()
            print(f"  {place:15s} {name:22s} seed {seed}: FAILED {failed['error']} (not recorded as a run; a rerun "
                  "tries again)", flush=True)
            return
        if place in rebuilt_sha:
            r["base_rebuilt_sha256"] = rebuilt_sha[place]
        log.add(r)
        lam = f" lambda {r['lambda_path'][0]:.2f}->{r['lambda_path'][-1]:.2f}" if r["lambda_path"] else ""
        print(f"  {place:15s} {name:22s} seed {seed}: exact match {r['test_acc']:.3f}, mean p after "
              f"{r['mean_p_after']:.3f}{lam} ({r['train_seconds']:.0f} s train, {r['seconds']:.0f} s total; "
              f"{time.time() - t_start:.0f} s so far)", flush=True)

    if not args.summary_only:
        for place in args.places:  # stage 1: every candidate at every place, seed 0, place by place
            for name in names:
                run(place, name, 0)
        if args.stage == 2 and args.design == "v2":  # stage 2 of v2: --seeds for those in contention
            for seed in args.seeds:
                for place in args.places:
                    prepare(place)
                    cell = cells_v2(log.runs, [place])[place]
                    if all(0 in cell[n] for n in names):  # stage 1 complete here
                        for name in in_contention({n: cell[n] for n in names}):
                            run(place, name, seed)
        elif args.stage == 2:  # stage 2: --seeds for those within two s.e. of the best fixed objective
            for seed in args.seeds:
                for place in args.places:
                    prepare(place)
                    cell = cells_from_runs(log.runs, {place: place_trainings(place, candidates, args)})[place]
                    if all(0 in cell[n] for n in names):  # stage 1 complete here
                        for name in stage_two(cell):
                            run(place, name, seed)
        for name in args.check:  # after the verdict: the seeds the staged rule did not give these candidates
            for seed in args.seeds:
                for place in args.places:
                    run(place, name, seed)

    import transformers
    import trl

    record.update(
        date=datetime.date.today().isoformat(),
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    )
    if args.design == "v2":  # the v1 verdict (summary, tables) stays as it was recorded
        v2 = verdict_v2(log.runs, args.place_info, list(PLACES))
        verdict = v2["verdict"]
        record.update(
            command_v2="python benchmarks/real_continuum.py " + " ".join(sys.argv[1:] if argv is None else argv),
            settings_v2={k: v for k, v in vars(args).items() if k != "place_info"},
            candidates_v2={n: kw for n, kw in CANDIDATES_V2},
            summary_v2=dict({k: v for k, v in verdict.items() if k != "tables"}, readings=v2["readings"],
                            signal_rule=v2["signal_rule"], pilot=v2["pilot"]),
            tables_v2={p: dict(best_fixed=t["best_fixed"], candidates=t["candidates"])
                       for p, t in verdict["tables"].items()},
        )
        log.save()
        print("\n" + format_summary_v2(v2, args.place_info), flush=True)
    else:
        place_candidates, verdict = rule_over(log.runs, args.place_info, args.places, candidates)
        record.update(
            command="python benchmarks/real_continuum.py " + " ".join(sys.argv[1:] if argv is None else argv),
            settings={k: v for k, v in vars(args).items() if k != "place_info"},
            candidates={n: kw for n, kw in candidates}, place_candidates=place_candidates,
            summary={k: v for k, v in verdict.items() if k != "tables"},
            tables={p: dict(best_fixed=t["best_fixed"], candidates={c: {k: v for k, v in r.items() if k != "hits"}
                                                                     for c, r in t["candidates"].items()})
                    for p, t in verdict["tables"].items()},
        )
        log.save()
        print("\n" + format_summary(verdict, args.place_info) + "\n\n" + format_markdown(verdict, args.place_info),
              flush=True)
    print(f"wrote {args.out}", flush=True)
    return dict(record, runs=log.runs, verdict=verdict)


def format_summary_v2(v2: dict, place_info: dict) -> str:
    """The v2 verdict as text: per place every candidate (losers included), the ranking, the readings beside it, the
    goal, the signal rule and the pilot's tests."""
    verdict, lines = v2["verdict"], []
    for place, t in verdict["tables"].items():
        info = place_info.get(place, {})
        start = info.get("start", {}).get("lambda_at_start", {})
        lines.append(f"{place}: base {info.get('base_exact_match', float('nan')):.3f}, trivial "
                     f"{info.get('trivial_baseline', float('nan')):.3f}; sequence_top1 lambda at step 1 "
                     f"{start.get('sequence_top1')}; best fixed {t['best_fixed']}"
                     + ("" if place in verdict["places_in_rule"] else " (incomplete: outside the rule)"))
        for c, r in sorted(t["candidates"].items(), key=lambda kv: -kv[1]["mean"]):
            ends = ""
            if "vs_endpoints" in r:
                ends = " | " + ", ".join(f"vs {e} {v['diff']:+.3f} ± {v['se']:.3f} {v['standing']}"
                                         for e, v in r["vs_endpoints"].items())
            lines.append(f"    {c:14s} {r['mean']:.3f} (seeds {len(r['seeds'])}, spread {r['seed_sd']:.3f}) vs best "
                         f"{r['diff']:+.3f} ± {r['diff_se']:.3f} {r['standing']}{ends}")
    lines.append(f"ranking over {verdict['places_in_rule']} (behind at {BEHIND_SE:g} combined s.e.):")
    for i, c in enumerate(verdict["ranking"], 1):
        v = verdict["per"][c]
        lines.append(f"  {i:2d}. {c:14s} behind {v['behind']} | ahead {v['ahead']} | mean rank {v['mean_rank']:.2f}")
    lines.append(f"auto by the rule: {verdict['auto']}; other readings: "
                 + "; ".join(f"{k}: {r['auto']}" for k, r in v2["readings"].items()))
    lines.append(f"goal: {verdict['goal']}")
    rule = v2["signal_rule"]
    lines.append("signal rule: " + "; ".join(f"{s} eligible {d['eligible']} mean rho {d['mean_spearman']}"
                                            for s, d in rule["signals"].items()) + f" -> {rule['chosen']}")
    lines.append(f"pilot: {v2['pilot']}")
    return "\n".join(lines)


def absorb(log: RunLog, path: str) -> None:
    """Join another worker's result file into ``log``: its places (a place measured differently in both is refused)
    and its runs (a key in both keeps ``log``'s). Workers on disjoint ``--places`` share the 2 cores: 1 thread each."""
    other = RunLog(path)
    places = log.record.setdefault("places", {})
    for place, info in other.record.get("places", {}).items():
        mine = places.get(place)
        if mine is not None and (mine.get("key"), mine.get("base_sha256")) != (info.get("key"), info.get("base_sha256")):
            raise SystemExit(f"real_continuum: --absorb {path}: place {place} was measured on another base or with "
                             f"other settings there than in {log.path}; absorb files made with the same settings")
        if mine is not None:  # the same place: what only the other file measured joins (the signals at step 1,
            # ``start``), and the rebuilds accepted in either file
            known = {b["base_sha256"] for b in mine.get("rebuilt_bases", [])}
            extra = [b for b in info.get("rebuilt_bases", []) if b["base_sha256"] not in known]
            mine.update({k: v for k, v in info.items() if k not in mine and k != "rebuilt_bases"})
            if extra:
                mine.setdefault("rebuilt_bases", []).extend(extra)
        places[place] = mine or info
    added = [r for r in other.runs if r["key"] not in log]
    for r in added:
        log.add(r, save=False)
    log.save()  # once, places and runs together
    print(f"absorbed {path}: {len(added)} runs added, {len(other.runs) - len(added)} already here", flush=True)


def rule_over(runs: list[dict], place_info: dict, places, candidates) -> tuple[dict, dict]:
    """``({place: {candidate: what it trains}}, the rule's verdict)`` over ``runs`` at those of ``places`` measured
    in ``place_info``."""
    args = argparse.Namespace(place_info=place_info)
    place_candidates = {p: place_trainings(p, candidates, args) for p in places if p in place_info}
    return place_candidates, apply_rule(cells_from_runs(runs, place_candidates), [n for n, _ in candidates])


def probe_kwargs(recommends: dict) -> dict:
    """The probe's recommendation as it trained: v1's probe advised schedules that followed the default signal of
    their day (token_top1), so a recorded adaptive recommendation without a signal is pinned to it."""
    if recommends.get("objective_schedule", "none") != "none" and "schedule_signal" not in recommends:
        return dict(recommends, schedule_signal="token_top1")
    return recommends


def place_trainings(place: str, candidates, args) -> dict:
    """``{candidate: what it trains at the place}`` (the probe's choice is the place's)."""
    rec = probe_kwargs(args.place_info[place]["probe_recommends"])
    return {n: training_of(rec if kw is None else kw) for n, kw in candidates}


if __name__ == "__main__":
    main()
