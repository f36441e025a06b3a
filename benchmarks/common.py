"""What the benchmark scripts share, written once: mean and s.e., the paired per-problem difference, the selection
rule's helpers, the resumable run log, weight hashing, the equation scorer, and the SmolLM2 builder (re-exported
from :mod:`trl_prob.models`).

Scripts run as ``python benchmarks/x.py``, so ``benchmarks/`` is on ``sys.path`` and ``from common import ...``
works; ``tests/conftest.py`` puts it there for the tests.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import re
import statistics

from trl_prob.models import cache_dir, smollm2_dir  # noqa: F401  (re-exported: the one SmolLM2 builder)

# ------------------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------------------


def compute_stats_columns(trainer, columns) -> None:
    """Make ``trainer`` compute these statistics column groups each step instead of the ones its run reads (benchmarks
    only: the before/after of issue 35, and every candidate signal along a run): its hook's class, with
    ``stats_columns`` fixed to ``columns``."""
    hook = trainer.objective_hook
    hook.__class__ = type(f"{type(hook).__name__}WithColumns", (type(hook),),
                          {"stats_columns": property(lambda self: columns)})  # fmt: skip


def mean_se(xs) -> tuple[float, float]:
    """Mean and standard error of the mean, stdev / sqrt(n) (0 for a single value: no spread measured)."""
    xs = list(xs)
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def paired_difference(a, b) -> dict:
    """``a - b`` paired per item (per test problem: ``a[i]`` and ``b[i]`` score the same problem): the mean of the
    differences, its s.e. (stdev of the differences / sqrt(n)), n, and how many items each side wins."""
    a, b = list(a), list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equal, non-empty lists (got {len(a)} and {len(b)} items)")
    d = [x - y for x, y in zip(a, b)]
    m, se = mean_se(d)
    return dict(mean=m, se=se, n=len(d), a_ahead=sum(x > 0 for x in d), b_ahead=sum(x < 0 for x in d))


def mean_over_seeds(per_seed: list[list[float]]) -> list[float]:
    """Per item, the mean over seeds of per-item scores (``per_seed[s][i]``: seed s, item i)."""
    if not per_seed or len({len(h) for h in per_seed}) != 1:
        raise ValueError("every seed must score the same items")
    return [statistics.fmean(col) for col in zip(*per_seed)]


# ------------------------------------------------------------------------------------------------------------------
# The selection rule's helpers
# ------------------------------------------------------------------------------------------------------------------


def standing(difference: float, se: float, k: float = 1.0) -> str:
    """``"behind"`` when a candidate trails the reference by more than ``k`` s.e. (``difference`` = candidate -
    reference), ``"ahead"`` when it leads by more than that, else ``"level"``."""
    if difference < -k * se:
        return "behind"
    if difference > k * se:
        return "ahead"
    return "level"


def average_ranks(values: dict) -> dict:
    """Rank 1 = highest value; ties share their average rank."""
    order = sorted(values, key=lambda c: -values[c])
    ranks, i = {}, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for c in order[i : j + 1]:
            ranks[c] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_by_rule(per: dict) -> list:
    """Candidates ordered by the rule: fewest places (rows) behind, then most ahead, then best mean rank.
    ``per[c]`` holds lists ``behind``, ``ahead`` and ``ranks``."""

    def key(c):
        ranks = per[c]["ranks"]
        return len(per[c]["behind"]), -len(per[c]["ahead"]), statistics.fmean(ranks) if ranks else math.inf

    return sorted(per, key=key)


# ------------------------------------------------------------------------------------------------------------------
# The resumable run log
# ------------------------------------------------------------------------------------------------------------------


class RunLog:
    """Runs recorded as they land, each keyed by its settings, so that a rerun skips the runs already there.

    ``path`` ending in ``.jsonl``: one run per line, appended and never rewritten (the toy grids'
    ``<out>.runs.jsonl``: runs set aside stay in the file). Otherwise a JSON object whose ``"runs"`` list holds the
    runs (one per line) beside other fields (``log.record``), rewritten atomically after every run; there a run whose
    key is already in the log replaces it. ``key(run)`` says what a run is (default: its ``"key"`` field)."""

    def __init__(self, path: str, key=None):
        self.path = path
        self.key = key or (lambda run: run["key"])
        self.jsonl = path.endswith(".jsonl")
        self.record: dict = {}
        self.runs: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                if self.jsonl:
                    self.runs = [json.loads(line) for line in f if line.strip()]
                else:
                    self.record = json.load(f)
                    self.runs = self.record.pop("runs", [])
        self._keys = {self._k(r) for r in self.runs}

    def _k(self, run):
        k = self.key(run)
        return tuple(k) if isinstance(k, list) else k

    def __contains__(self, key) -> bool:
        return (tuple(key) if isinstance(key, list) else key) in self._keys

    def __len__(self) -> int:
        return len(self.runs)

    def add(self, run: dict, save: bool = True) -> None:
        """Record ``run``; ``save=False`` leaves writing a JSON log to a later :meth:`save` (many runs at once)."""
        k = self._k(run)
        if self.jsonl:
            self.runs.append(run)
            self._keys.add(k)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(run) + "\n")
            return
        self.runs = [r for r in self.runs if self._k(r) != k] + [run]
        self._keys.add(k)
        if save:
            self.save()

    def save(self) -> None:
        """Write the whole log (atomically: a run cut short leaves the previous file)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            if self.jsonl:
                f.writelines(json.dumps(r) + "\n" for r in self.runs)
            else:  # the other fields indented, each run on one line (hits lists stay readable in a diff)
                head = json.dumps(self.record, indent=1, default=str)
                runs = ",\n".join(json.dumps(r, default=str) for r in self.runs)
                body = '{\n "runs": [\n' + runs + "\n ]" + ("," + head[1:] if self.record else "\n}")
                f.write(body + "\n")
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------------------------
# Weight hashing
# ------------------------------------------------------------------------------------------------------------------


def weights_sha256(model_dir: str) -> str:
    """The first 16 hex digits of the SHA-256 of a model directory's weight files: which base a run trained from
    (bases are rebuilt on each machine, and floating point differs between CPUs)."""
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(model_dir) if n.endswith((".safetensors", ".bin"))):
        with open(os.path.join(model_dir, name), "rb") as f:
            for block in iter(functools.partial(f.read, 1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------------
# The equation scorer: what a generated completion answers
# ------------------------------------------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
MARKER = re.compile(r"answer is\s*:?\s*\$?\s*(" + NUMBER.pattern + ")", re.IGNORECASE)
ARITHMETIC = re.compile(r"[\d\s.+\-*/()]+")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


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


def _parse_infix(text: str):
    """The syntax tree of an arithmetic expression of numbers and + - * / ( ), or None."""
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
    tree = _parse_infix(text)
    if tree is None:
        return None

    def value(node):
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.UnaryOp):
            return -value(node.operand)
        return OPS[_SYMBOL[type(node.op)]](value(node.left), value(node.right))

    try:
        return value(tree)
    except (ZeroDivisionError, OverflowError):
        return None


def to_prefix(text: str) -> str:
    """An infix expression in prefix (Polish) notation: "(4 + 22) - 6" -> "- + 4 22 6"."""
    tree = _parse_infix(text)
    if tree is None:
        raise ValueError(f"not an arithmetic expression: {text!r}")

    def walk(node) -> list[str]:
        if isinstance(node, ast.Constant):
            return [format_number(node.value)]
        if isinstance(node, ast.UnaryOp):
            return [format_number(-float(node.operand.value))] if isinstance(node.operand, ast.Constant) else (
                ["-", "0", *walk(node.operand)])
        return [_SYMBOL[type(node.op)], *walk(node.left), *walk(node.right)]

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
