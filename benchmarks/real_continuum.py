"""The capability continuum on a real model: SmolLM2-135M-Instruct, LoRA SFT on real math word problems, every
candidate objective side by side at several places on the continuum, on 2 CPU cores.

Data (benchmarks/data/real_continuum/, sources and licences in its README): MAWPS (SingleOp, AddSub, MultiArith)
and SVAMP word problems, as chat rows (user: the problem; assistant: the completion). Places (see
PLACES): the base model on answer-only rows ("The answer is N."), the same with 20% noisy answers, a harder
format (the equation, then the answer), and a strong base made by a short NLL LoRA warm-up on a disjoint split,
merged into the weights, saved once and reused. Each place is measured before training by the probe (mean target p
and token_top1 on the rows it trains on) and by held-out greedy exact match.

Each candidate (CANDIDATES: a name and ProbSFTConfig kwargs; `deft`, `deft_cayley`, `eaft:1` and `auto` join by
themselves once trl_prob accepts them) trains the same LoRA (top layers only, so the backward stops early), rows,
steps and learning rate at each place, with several seeds; held-out greedy exact match on the place's test problems
(never trained on, clean answers), mean target p before and after, and lambda's path for scheduled candidates.

    python benchmarks/real_continuum.py            # the table (benchmarks/README.md), about an hour on 2 cores
    python benchmarks/real_continuum.py --quick    # 2 places, 1 seed, fewer test problems: about 10 minutes

Results go to benchmarks/results/real_continuum.json (one entry per run under "runs") and .png; a rerun skips the
runs already in the JSON (same place, objective, seed and settings) and only adds what is missing.
"""

from __future__ import annotations

import argparse
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA_DIR = os.path.join(HERE, "data", "real_continuum")
OUT = os.path.join(HERE, "results", "real_continuum.json")

# ------------------------------------------------------------------------------------------------------------------
# Candidates: (name, ProbSFTConfig kwargs). Append to extend the table; a rerun adds only the new runs.
# ------------------------------------------------------------------------------------------------------------------

CANDIDATES = [
    ("nll", dict(objective="nll")),
    ("p", dict(objective="p")),
    ("default", dict(objective="p", objective_schedule="adaptive")),  # today's default: adaptive, default signal
]
# Joined automatically once trl_prob accepts them (the confidence-aware issue adds them).
OPTIONAL_CANDIDATES = [
    ("deft", dict(objective="deft")),
    ("deft_cayley", dict(objective="deft_cayley")),
    ("eaft:1", dict(objective="eaft:1")),
    ("auto", dict(objective="auto")),
]
FIXED = {"nll", "p", "deft", "deft_cayley", "eaft:1"}  # "the best fixed objective" is the best of these present


def accepted(kwargs: dict) -> bool:
    """trl_prob accepts this candidate: its objective parses and ProbSFTConfig takes the kwargs."""
    from trl_prob import ProbSFTConfig
    from trl_prob.objectives import get_objective

    try:
        if kwargs.get("objective", "nll") != "auto":
            get_objective(kwargs["objective"])
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(open(os.devnull, "w")):
            ProbSFTConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", **kwargs)
    except Exception:  # noqa: BLE001 - any refusal means "not there yet"
        return False
    return True


def available_candidates() -> list[tuple[str, dict]]:
    return list(CANDIDATES) + [(name, kw) for name, kw in OPTIONAL_CANDIDATES if accepted(kw)]


def resolved(kwargs: dict) -> str:
    return _resolved(json.dumps(kwargs, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _resolved(kwargs_json: str) -> str:
    """What a candidate trains, after trl_prob resolves it (``auto`` becomes its chosen settings): the ProbSFTConfig
    fields trl_prob adds to TRL's SFTConfig, as JSON."""
    from trl import SFTConfig

    from trl_prob import ProbSFTConfig

    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(open(os.devnull, "w")):
        config = ProbSFTConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", **json.loads(kwargs_json))
    own = sorted(set(ProbSFTConfig.__dataclass_fields__) - set(SFTConfig.__dataclass_fields__))
    return json.dumps({k: getattr(config, k) for k in own}, sort_keys=True, default=str)


def aliases(candidates: list[tuple[str, dict]]) -> dict[str, str]:
    """Candidates that resolve to the same training as an earlier one (today ``auto`` = ``default``): name -> the
    earlier name. Their runs would repeat the earlier runs seed for seed, so the table shows the earlier runs under
    both names, and a rerun trains them once ``auto`` resolves to something else."""
    seen, out = {}, {}
    for name, kwargs in candidates:
        sig = resolved(kwargs)
        if sig in seen:
            out[name] = seen[sig]
        else:
            seen[sig] = name
    return out


# ------------------------------------------------------------------------------------------------------------------
# Answer extraction (the one place it is written; tests/test_real_continuum.py)
# ------------------------------------------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
MARKER = re.compile(r"answer is\s*:?\s*\$?\s*(" + NUMBER.pattern + ")", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The number after the first "answer is" (the trained format), else the last number in ``text``; commas and
    a trailing sentence dot dropped. ``None`` when the text holds no number."""
    marked = MARKER.search(text)
    if marked:
        found = marked.group(1)
    else:
        numbers = NUMBER.findall(text)
        if not numbers:
            return None
        found = numbers[-1]
    return found.replace(",", "")


def same_number(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(reference)) < 1e-6
    except ValueError:
        return False


def format_number(value) -> str:
    """43.0 -> "43", 2.50 -> "2.5", "1,000" -> "1000"."""
    x = float(str(value).replace(",", ""))
    if x == int(x):
        return str(int(x))
    return f"{x:.6f}".rstrip("0").rstrip(".")


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


ARITHMETIC = re.compile(r"[\d\s.+\-*/()]+")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def _parse_infix(text: str):
    """The syntax tree of an arithmetic expression of numbers and + - * / ( ), or None."""
    import ast

    if not ARITHMETIC.fullmatch(text) or not NUMBER.search(text):
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None

    def ok(node) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, float))
        if isinstance(node, ast.BinOp):
            return isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)) and ok(node.left) and ok(node.right)
        if isinstance(node, ast.UnaryOp):
            return isinstance(node.op, ast.USub) and ok(node.operand)
        return False

    return tree if ok(tree) else None


def evaluate_infix(text: str) -> float | None:
    """The value of an infix arithmetic expression ("290 / 2", "(4 + 22) - 6"), or None (not one, or / 0)."""
    import ast

    tree = _parse_infix(text)
    if tree is None:
        return None
    symbol = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def value(node):
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.UnaryOp):
            return -value(node.operand)
        return OPS[symbol[type(node.op)]](value(node.left), value(node.right))

    try:
        return value(tree)
    except (ZeroDivisionError, OverflowError):
        return None


def to_prefix(text: str) -> str:
    """An infix expression in prefix (Polish) notation: "(4 + 22) - 6" -> "- + 4 22 6"."""
    import ast

    tree = _parse_infix(text)
    if tree is None:
        raise ValueError(f"not an arithmetic expression: {text!r}")
    symbol = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def walk(node) -> list[str]:
        if isinstance(node, ast.Constant):
            return [format_number(node.value)]
        if isinstance(node, ast.UnaryOp):
            return [format_number(-float(node.operand.value))] if isinstance(node.operand, ast.Constant) else (
                ["-", "0", *walk(node.operand)])
        return [symbol[type(node.op)], *walk(node.left), *walk(node.right)]

    return " ".join(walk(tree))


def evaluate_prefix(text: str) -> float | None:
    """The value of a prefix expression ("- + 4 22 6" -> 20), or None (malformed, trailing tokens, or / 0)."""
    tokens = text.split()
    position = 0

    def parse():
        nonlocal position
        if position >= len(tokens):
            raise ValueError("short")
        token = tokens[position]
        position += 1
        if token in OPS:
            left, right = parse(), parse()
            return OPS[token](left, right)
        if not NUMBER.fullmatch(token):
            raise ValueError(token)
        return float(token.replace(",", ""))

    try:
        result = parse()
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return result if position == len(tokens) else None


def predicted_value(text: str, fmt: str) -> str | None:
    """What a generated completion answers, as a number string: for the equation formats the value of the expression
    it writes (its first line, up to any "=" or final dot), computed here, so the model is scored on choosing the
    numbers and operations, not on doing the arithmetic; else, or when that does not parse, :func:`extract_answer`."""
    if fmt in ("equation", "prefix"):
        line = text.strip().split("\n")[0].split("=")[0].strip().rstrip(".").strip()
        value = evaluate_infix(line) if fmt == "equation" else evaluate_prefix(line)
        if value is not None:
            return format_number(round(value, 6))
    return extract_answer(text)


def equation_ok(row: dict) -> bool:
    """An equation of numbers and + - * / ( ) only, whose value is the answer (a few rows round it)."""
    eq = row.get("equation")
    value = evaluate_infix(eq) if eq else None
    return value is not None and abs(value - float(row["answer"])) < 1e-6


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


# A place: which problems, which format, label noise, and whether the base is first warmed up (NLL, disjoint rows).
# The places use MAWPS SingleOp + AddSub with derived equations; SVAMP (its own equations) and the answer-only format
# were tried first and dropped: 6% and 3-5% held-out exact match after NLL (benchmarks/README.md).
EASY = ["mawps_singleop", "mawps_addsub"]
PLACES = {
    "weak": dict(sources=EASY, fmt="prefix", noise=0.0, warmup=False),
    "mid": dict(sources=EASY, fmt="equation", noise=0.0, warmup=False),
    "mid_noise20": dict(sources=EASY, fmt="equation", noise=0.2, warmup=False),
    "strong": dict(sources=EASY, fmt="equation", noise=0.0, warmup=True),
    "strong_noise20": dict(sources=EASY, fmt="equation", noise=0.2, warmup=True),
    "svamp": dict(sources=["svamp"], fmt="equation", noise=0.0, warmup=False),
    "answer": dict(sources=["mawps_singleop", "mawps_addsub", "mawps_multiarith", "svamp"], fmt="answer", noise=0.0,
                   warmup=False),
}


def place_splits(place: str, args, problems: dict) -> dict:
    """Disjoint test / train / warm-up rows of a place, fixed by SPLIT_SEED (the same for every candidate and seed).
    Places that share sources share the same shuffle, so a strong base's warm-up rows are never its test rows."""
    spec = PLACES[place]
    pool = [r for s in spec["sources"] for r in problems[s] if spec["fmt"] == "answer" or equation_ok(r)]
    seen, unique = set(), []
    for r in pool:  # the same question twice in a pool (ASDiv / SVAMP overlap) would leak test into train
        if r["question"] not in seen:
            seen.add(r["question"])
            unique.append(r)
    random.Random(args.split_seed).shuffle(unique)
    n_test, n_train, n_warm = args.test_rows, args.train_rows, args.warmup_rows
    if n_test + n_train + n_warm > len(unique):
        raise ValueError(f"place {place}: {len(unique)} problems, asked for {n_test + n_train + n_warm}")
    test = unique[:n_test]
    train = unique[n_test : n_test + n_train]
    warm = unique[n_test + n_train : n_test + n_train + n_warm]
    rng = random.Random(args.split_seed + 1)
    noisy = set(rng.sample(range(len(train)), round(spec["noise"] * len(train))))
    def noisy_row(r):
        if spec["fmt"] == "answer":
            return chat_row(r, spec["fmt"], answer=noisy_answer(r["answer"], rng))
        return chat_row(r, spec["fmt"], equation=noisy_equation(r["equation"], r["answer"], rng))

    train_rows = [noisy_row(r) if i in noisy else chat_row(r, spec["fmt"]) for i, r in enumerate(train)]
    return dict(test=test, train=train_rows, warm=[chat_row(r, spec["fmt"]) for r in warm], fmt=spec["fmt"])


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


def load_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def make_trainer(model_dir: str, rows: list[dict], args, kwargs: dict, seed: int, out: str, steps: int, lr: float,
                 callbacks=()):
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed

    from trl_prob import ProbSFTConfig, ProbSFTTrainer

    set_seed(seed)  # the LoRA init happens when the trainer wraps the model, before the Trainer seeds itself
    config = ProbSFTConfig(
        output_dir=out, use_cpu=True, bf16=False, max_length=args.max_length, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=32, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=2, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        gradient_checkpointing=False, seed=seed, data_seed=seed, dataloader_num_workers=0,
        schedule_warm_start_samples=min(args.probe_rows, len(rows)), **kwargs)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ProbSFTTrainer(model=load_model(model_dir), args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=lora_config(model_dir, args),
                          callbacks=list(callbacks))  # fmt: skip


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


def exact_match(model, tokenizer, test: list[dict], args, fmt: str) -> tuple[float, list[str]]:
    """Greedy exact match of the extracted final number against the clean answer."""
    answers = generate_answers(model, tokenizer, [r["question"] for r in test], args.eval_batch, args.max_new_tokens)
    hits = sum(same_number(predicted_value(a, fmt), r["answer"]) for a, r in zip(answers, test))
    return hits / len(test), answers


# ------------------------------------------------------------------------------------------------------------------
# Places: the base model of each (the strong one warmed up once and cached) and its measured placement
# ------------------------------------------------------------------------------------------------------------------


def settings_key(args, *extra) -> str:
    fields = dict(model=args.model, split_seed=args.split_seed, train_rows=args.train_rows, test_rows=args.test_rows,
                  warmup_rows=args.warmup_rows, max_length=args.max_length, lora_r=args.lora_r,
                  lora_layers=args.lora_layers, batch=args.batch, extra=extra)
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]


def base_dir_for(place: str, split: dict, args) -> str:
    """The model directory a place trains from: the model itself, or (warm-up places) the model after a short NLL
    LoRA warm-up on the place's disjoint warm-up rows, merged and saved once under ``args.cache_dir``."""
    if not PLACES[place]["warmup"]:
        return args.model
    key = settings_key(args, "warmup", PLACES[place]["fmt"], PLACES[place]["sources"], args.warmup_steps,
                       args.warmup_lr)
    path = os.path.join(args.cache_dir, f"warm-{key}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(args.model, split["warm"], args, dict(objective="nll"), seed=0, out=out,
                               steps=args.warmup_steps, lr=args.warmup_lr)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            trainer.train()
        merged = trainer.model.merge_and_unload()
        tmp = path + f".tmp{os.getpid()}"
        merged.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
        os.replace(tmp, path)
    print(f"  warm-up base for {place}: {args.warmup_steps} NLL steps on {len(split['warm'])} disjoint rows, "
          f"{time.time() - t0:.0f} s -> {path}", flush=True)
    return path


def weights_sha256(model_dir: str) -> str:
    """The first 16 hex digits of the SHA-256 of a model directory's weight files: which base a run trained from."""
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(model_dir) if n.endswith((".safetensors", ".bin"))):
        with open(os.path.join(model_dir, name), "rb") as f:
            for block in iter(functools.partial(f.read, 1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def check_same_base(place: str, recorded: dict, fresh: dict, out: str) -> None:
    """Refuse to add runs to a place whose base, built again here, is not the one its recorded runs trained from.

    A warm-up base is rebuilt on each new machine, and floating point differs between CPUs: the same 20 steps can
    give another base (another place on the continuum). Runs of two bases must not be averaged as seeds of one."""
    if recorded.get("base_sha256") is not None:
        same = recorded["base_sha256"] == fresh["base_sha256"]
    else:  # recorded before weights were hashed: compare what was measured of the base
        same = (recorded.get("base_test_acc") == fresh["base_test_acc"]
                and abs(recorded["probe"]["mean_p"] - fresh["probe"]["mean_p"]) < 1e-6)
    if not same:
        raise SystemExit(
            f"real_continuum: place {place}: the base built here (exact match {fresh['base_test_acc']:.3f}, probe "
            f"mean p {fresh['probe']['mean_p']:.4f}) is not the base of the runs in {out} (exact match "
            f"{recorded.get('base_test_acc', float('nan')):.3f}, mean p {recorded['probe']['mean_p']:.4f}); write "
            f"these runs to another --out, or point --cache_dir at the original base")


def measure_place(place: str, split: dict, base_dir: str, args) -> dict:
    from transformers import AutoTokenizer

    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(base_dir, split["train"], args, dict(objective="nll"), seed=0, out=out, steps=1,
                               lr=0.0)
        probe = probe_stats(trainer, args.probe_rows)
        del trainer
    model = load_model(base_dir)
    acc, answers = exact_match(model, AutoTokenizer.from_pretrained(base_dir), split["test"], args, split["fmt"])
    info = dict(place=place, **{k: v for k, v in PLACES[place].items()}, base_dir=base_dir, probe=probe,
                base_test_acc=acc, test_rows=len(split["test"]), train_rows=len(split["train"]),
                first_answers=answers[:3], seconds=round(time.time() - t0, 1))
    print(f"  place {place:14s} probe mean p {probe['mean_p']:.3f} token_top1 {probe['token_top1']:.3f} | base exact "
          f"match {acc:.3f} on {len(split['test'])} ({info['seconds']:.0f} s)", flush=True)
    return info


# ------------------------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------------------------


def run_one(place: str, split: dict, base_dir: str, name: str, kwargs: dict, seed: int, args) -> dict:
    from transformers import TrainerCallback

    t0 = time.time()
    lambdas = []

    class RecordLambda(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            lambdas.append(float(trainer.objective_lambda))

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(base_dir, split["train"], args, kwargs, seed, out, args.steps, args.lr,
                               callbacks=[RecordLambda()])
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            trainer.train()
        trained = time.time() - t0
        after = probe_stats(trainer, args.probe_rows)
        acc, answers = exact_match(trainer.model, trainer.processing_class, split["test"], args, split["fmt"])
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    scheduled = kwargs.get("objective_schedule", "none") != "none" or kwargs.get("objective") == "auto"
    return dict(place=place, objective=name, seed=seed, config=kwargs, test_acc=acc,
                mean_p_before=args.place_info[place]["probe"]["mean_p"], mean_p_after=after["mean_p"],
                token_top1_after=after["token_top1"],
                lambda_path=lambdas if scheduled else None, steps=args.steps, lr=args.lr,
                loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                first_answers=answers[:3], train_seconds=round(trained, 1), seconds=round(time.time() - t0, 1),
                key=run_key(place, name, kwargs, seed, args))  # fmt: skip


def run_key(place, name, kwargs, seed, args) -> str:
    return f"{place}|{name}|{seed}|" + settings_key(args, resolved(kwargs), args.steps, args.lr, args.max_new_tokens)


# ------------------------------------------------------------------------------------------------------------------
# Summary and the selection rule
# ------------------------------------------------------------------------------------------------------------------


def mean_se(xs):
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def summarise(runs: list[dict], default: str = "default") -> dict:
    """Per place and candidate: mean +- s.e. of test accuracy over seeds; per place the goal check (best fixed vs
    worst fixed separated by more than one combined s.e.; ``default`` within one combined s.e. of the best fixed);
    over places, the selection rule of issue 21 applied to every candidate: fewest places more than one combined s.e.
    behind the best fixed objective, then most places more than one combined s.e. ahead of it, then mean rank."""
    places = list(dict.fromkeys(r["place"] for r in runs))
    names = list(dict.fromkeys(r["objective"] for r in runs))
    table = {}
    for place in places:
        cell = {}
        for name in names:
            rs = [r for r in runs if r["place"] == place and r["objective"] == name]
            if not rs:
                continue
            m, se = mean_se([r["test_acc"] for r in rs])
            pa = [r["mean_p_after"] for r in rs if r.get("mean_p_after") is not None]
            entry = dict(mean=m, se=se, n=len(rs), seeds=sorted(r["seed"] for r in rs),
                         mean_p_after=statistics.fmean(pa) if pa else None)
            paths = [r["lambda_path"] for r in rs if r.get("lambda_path")]
            if paths:
                length = min(map(len, paths))
                entry["lambda_path_mean"] = [statistics.fmean(p[i] for p in paths) for i in
                                             sorted({0, length // 4, length // 2, 3 * length // 4, length - 1})]
            cell[name] = entry
        table[place] = cell

    goal = {}
    per = {n: dict(behind=[], ahead=[], ranks=[]) for n in names}
    for place, cell in table.items():
        fixed = {n: r for n, r in cell.items() if n in FIXED}
        if len(fixed) < 2:
            continue
        best_name = max(fixed, key=lambda n: fixed[n]["mean"])
        worst_name = min(fixed, key=lambda n: fixed[n]["mean"])
        best, worst = fixed[best_name], fixed[worst_name]
        sep_se = math.hypot(best["se"], worst["se"])
        g = dict(best_fixed=best_name, worst_fixed=worst_name, gap=best["mean"] - worst["mean"], gap_se=sep_se,
                 separated=bool(best["mean"] - worst["mean"] > sep_se))
        if default in cell:
            d = cell[default]
            se = math.hypot(best["se"], d["se"])
            g.update(default_gap=best["mean"] - d["mean"], default_se=se,
                     default_within=bool(best["mean"] - d["mean"] <= se))
        g["met"] = bool(g["separated"] and g.get("default_within", False))
        goal[place] = g
        order = sorted(cell, key=lambda n: -cell[n]["mean"])
        for n, r in cell.items():
            se = math.hypot(best["se"], r["se"])
            if best["mean"] - r["mean"] > se:
                per[n]["behind"].append(place)
            if r["mean"] - best["mean"] > se:
                per[n]["ahead"].append(place)
            # ties share the better rank
            per[n]["ranks"].append(1 + sum(cell[o]["mean"] > r["mean"] for o in order))
    for n in names:
        per[n]["mean_rank"] = statistics.fmean(per[n]["ranks"]) if per[n]["ranks"] else None
    ranking = sorted(names, key=lambda n: (len(per[n]["behind"]), -len(per[n]["ahead"]),
                                           per[n]["mean_rank"] if per[n]["mean_rank"] is not None else 99))
    return dict(table=table, goal=goal, selection=dict(ranking=ranking, per=per),
                goal_met_everywhere=bool(goal) and all(g["met"] for g in goal.values()))


def format_summary(summary: dict, place_info: dict) -> str:
    table = summary["table"]
    names = list(dict.fromkeys(n for cell in table.values() for n in cell))
    head = f"{'place':15s} {'probe p':>7s} {'top1':>5s} {'base':>5s} " + " ".join(f"{n:>13s}" for n in names)
    lines = [head]
    for place, cell in table.items():
        info = place_info.get(place, {})
        probe = info.get("probe", {})
        cells = [f"{cell[n]['mean']:.3f}±{cell[n]['se']:.3f}".rjust(13) if n in cell else " " * 13 for n in names]
        lines.append(f"{place:15s} {probe.get('mean_p', float('nan')):7.3f} {probe.get('token_top1', float('nan')):5.3f} "
                     f"{info.get('base_test_acc', float('nan')):5.3f} " + " ".join(cells))
    lines.append("")
    for place, g in summary["goal"].items():
        line = (f"  {place}: best fixed {g['best_fixed']} - worst fixed {g['worst_fixed']} = {g['gap']:+.3f} "
                f"(combined s.e. {g['gap_se']:.3f}: {'separated' if g['separated'] else 'NOT separated'})")
        if "default_gap" in g:
            line += (f"; best fixed - default = {g['default_gap']:+.3f} (s.e. {g['default_se']:.3f}: "
                     f"{'within' if g['default_within'] else 'NOT within'})")
        lines.append(line)
    lines.append("")
    lines.append("selection (fewest places behind the best fixed, then most places ahead, then mean rank):")
    for i, n in enumerate(summary["selection"]["ranking"], 1):
        v = summary["selection"]["per"][n]
        rank = f"{v['mean_rank']:.2f}" if v["mean_rank"] is not None else "-"
        lines.append(f"  {i}. {n:12s} behind {len(v['behind'])} {v['behind']} | ahead {len(v['ahead'])} "
                     f"{v['ahead']} | mean rank {rank}")
    return "\n".join(lines)


def format_markdown(summary: dict, place_info: dict) -> str:
    """The table as benchmarks/README.md shows it: one row per place and candidate, losers included."""
    lines = ["| place | probe mean p / token_top1 (base) | base exact match | candidate | seeds | held-out exact match "
             "(mean ± s.e.) | mean p after | lambda (first ... last, mean over seeds) |",
             "|---|---|---|---|---|---|---|---|"]
    for place, cell in summary["table"].items():
        info = place_info.get(place, {})
        probe = info.get("probe", {})
        for i, (name, r) in enumerate(sorted(cell.items(), key=lambda kv: -kv[1]["mean"])):
            lam = " ".join(f"{x:.2f}" for x in r["lambda_path_mean"]) if r.get("lambda_path_mean") else "-"
            pa = f"{r['mean_p_after']:.3f}" if r.get("mean_p_after") is not None else "-"
            head = (f"| {place} | {probe.get('mean_p', float('nan')):.3f} / {probe.get('token_top1', float('nan')):.3f} | "
                    f"{info.get('base_test_acc', float('nan')):.3f} |") if i == 0 else "| | | |"
            lines.append(f"{head} {name} | {r['n']} | {r['mean']:.3f} ± {r['se']:.3f} | {pa} | {lam} |")
    return "\n".join(lines)


def plot(summary: dict, place_info: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    places = list(table)
    names = list(dict.fromkeys(n for cell in table.values() for n in cell))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(places) * max(1, len(names)) / 3), 4))
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(places))]
        ms = [table[p][n]["mean"] if n in table[p] else float("nan") for p in places]
        ses = [table[p][n]["se"] if n in table[p] else 0 for p in places]
        ax.bar(xs, ms, width, yerr=ses, capsize=2, label=n)
    for i, p in enumerate(places):
        base = place_info.get(p, {}).get("base_test_acc")
        if base is not None:
            ax.hlines(base, i - 0.4, i + 0.4, colors="k", linestyles="dotted")
    labels = [f"{p}\nprobe p {place_info.get(p, {}).get('probe', {}).get('mean_p', float('nan')):.2f}" for p in places]
    ax.set_xticks(range(len(places)), labels)
    ax.set_ylabel("held-out exact match (mean ± s.e. over seeds)")
    ax.set_title("SmolLM2-135M-Instruct, LoRA SFT on math word problems (dotted: base model)", fontsize=9)
    ax.legend(fontsize=8, ncol=min(4, len(names)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def _save(record: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 places, 1 seed, 100 test problems, the 3 core candidates (~10 minutes)")
    parser.add_argument("--places", nargs="+", default=None, choices=list(PLACES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--only", nargs="+", default=None, help="candidate names to run (default: all available)")
    parser.add_argument("--steps", type=int, default=None, help="LoRA steps per run")
    parser.add_argument("--lr", type=float, default=1e-3, help="one learning rate for every candidate")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train_rows", type=int, default=None, help="training rows per place (default: steps x batch)")
    parser.add_argument("--test_rows", type=int, default=None)
    parser.add_argument("--warmup_rows", type=int, default=160)
    parser.add_argument("--warmup_steps", type=int, default=20)
    parser.add_argument("--warmup_lr", type=float, default=1e-3)
    parser.add_argument("--probe_rows", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=160)
    parser.add_argument("--max_new_tokens", type=int, default=20, help="greedy tokens per answer")
    parser.add_argument("--eval_batch", type=int, default=100)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_layers", type=int, default=6, help="LoRA on the top N decoder layers only")
    parser.add_argument("--split_seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on an oversubscribed machine)")
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data_dir", default=DATA_DIR)
    parser.add_argument("--cache_dir", default=None, help="where warm-up bases are kept")
    parser.add_argument("--out", default=None)
    parser.add_argument("--summary_only", action="store_true", help="train nothing: merge, summarise, plot")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="JSON files of other workers (same settings, other seeds) whose runs join --out")
    args = parser.parse_args(argv)
    quick = args.quick
    args.places = args.places or (["mid", "strong_noise20"] if quick else ["weak", "mid", "strong_noise20"])
    args.seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    args.steps = args.steps or 16
    args.train_rows = args.train_rows or args.steps * args.batch
    args.test_rows = args.test_rows or (100 if quick else 200)
    args.out = args.out or (OUT.replace(".json", "_quick.json") if quick else OUT)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    _quiet()
    if args.model is None:
        sys.path.insert(0, HERE)
        from trl_prob.models import cache_dir, smollm2_dir

        args.model = smollm2_dir()
        args.cache_dir = args.cache_dir or os.path.join(cache_dir(), "real_continuum")
    args.cache_dir = args.cache_dir or os.path.join(tempfile.gettempdir(), "trl-prob-real-continuum")
    candidates = list(CANDIDATES) if args.quick and not args.only else available_candidates()
    if args.only:
        candidates = [c for c in candidates if c[0] in args.only]
    alias = aliases(candidates)
    print(f"candidates: {', '.join(n for n, _ in candidates)} (same training as another: {alias or 'none'}); places: {', '.join(args.places)}; seeds {args.seeds}; "
          f"{args.steps} steps x batch {args.batch}, lr {args.lr}, LoRA r={args.lora_r} on the top {args.lora_layers} "
          f"layers", flush=True)

    record = {"runs": [], "places": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            record = json.load(f)
    for path in args.merge or ():  # runs of other workers (e.g. one process per seed), by key
        with open(path) as f:
            other = json.load(f)
        keys = {r["key"] for r in record["runs"]}
        record["runs"] += [r for r in other["runs"] if r["key"] not in keys]
        for place, info in other.get("places", {}).items():
            record.setdefault("places", {}).setdefault(place, info)
    done = {r["key"] for r in record["runs"]}
    problems = load_problems(args.data_dir)
    args.place_info = record.setdefault("places", {})
    t_start = time.time()
    prepared = {}
    for place in [] if args.summary_only else args.places:  # every place's rows, base and placement first
        split = place_splits(place, args, problems)
        base_dir = base_dir_for(place, split, args)
        pkey = settings_key(args, "place", place, PLACES[place], args.max_new_tokens, base_dir)
        sha, info = weights_sha256(base_dir), args.place_info.get(place, {})
        if info.get("key") != pkey or info.get("base_sha256") != sha:
            fresh = dict(measure_place(place, split, base_dir, args), key=pkey, base_sha256=sha)
            if any(r["place"] == place for r in record["runs"]) and info.get("key") == pkey:
                check_same_base(place, info, fresh, args.out)
            args.place_info[place] = fresh
            _save(record, args.out)
        prepared[place] = split, base_dir
    for seed in [] if args.summary_only else args.seeds:  # seed by seed: a run cut short holds whole seeds
        for place in args.places:
            split, base_dir = prepared[place]
            for name, kwargs in candidates:
                if name in alias:
                    continue
                key = run_key(place, name, kwargs, seed, args)
                if key in done:
                    continue
                run = run_one(place, split, base_dir, name, kwargs, seed, args)
                record["runs"] = [r for r in record["runs"] if (r["place"], r["objective"], r["seed"]) !=
                                  (place, name, seed)] + [run]  # a run with other settings is replaced
                done.add(key)
                _save(record, args.out)
                lam = f" lambda {run['lambda_path'][0]:.2f}->{run['lambda_path'][-1]:.2f}" if run["lambda_path"] else ""
                print(f"  {place:14s} {name:12s} seed {seed}: test acc {run['test_acc']:.3f}, mean p "
                      f"{run['mean_p_before']:.3f} -> {run['mean_p_after']:.3f}{lam} ({run['train_seconds']:.0f} s "
                      f"train, {run['seconds']:.0f} s total; {time.time() - t_start:.0f} s so far)", flush=True)

    import transformers
    import trl

    runs = [r for r in record["runs"] if r["place"] in args.places]
    record["aliases"] = alias
    runs += [dict(r, objective=name, alias_of=target) for name, target in alias.items() for r in runs
             if r["objective"] == target]
    summary = summarise(runs)
    record.update(
        date=datetime.date.today().isoformat(),
        command="python benchmarks/real_continuum.py " + " ".join(sys.argv[1:] if argv is None else argv),
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        settings={k: v for k, v in vars(args).items() if k not in ("place_info",)},
        summary=summary,
    )
    _save(record, args.out)
    text = format_summary(summary, args.place_info)
    print("\n" + text + "\n\n" + format_markdown(summary, args.place_info), flush=True)
    plot(summary, args.place_info, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.png", flush=True)
    return record


if __name__ == "__main__":
    main()
