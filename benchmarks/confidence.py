"""Confidence-aware candidates and ``--objective auto``: which configuration should be the default?

Issue 21's comparison, on signals.py's grid and sources.py's mixture, with their machinery (data, bases, worker
initialiser and one-run functions are imported, not copied). Every candidate runs at its registered defaults, never
tuned per row; one learning rate per budget for all (signals.py's: 1e-3 short, 3e-3 long; sources.py's 1e-3).

Candidates (``CANDIDATES``: the exact ``ProbSFTConfig`` settings of each):

- fixed objectives: ``nll``, ``p``, ``deft``, ``deft_cayley``, ``eaft:1``; "the best fixed objective" of a row is the
  best of these;
- scheduled: today's default ``adaptive:token_top1`` (``objective="p"``, adaptive, signal ``token_top1``),
  ``adaptive:token_top1_clean`` (the signal leaving out confident conflicts), ``token_gate:sum_sq`` (each token's own
  lambda from its own sum_v p_v^2), ``progress`` (NLL while the fresh-batch NLL still falls) and
  ``adaptive:token_top1->deft`` (adaptive toward ``deft`` instead of ``p``);
- hindsight upper bounds, long rows only and outside the selection: ``linear@0.10`` ... ``linear@0.75``, a linear ramp
  from NLL to ``p`` starting at 10/25/50/75% of the run over 25% of it.

Rows: signals.py's 9 (3 families x {partial, strong} at 20% noise, add2 strong at 0% and 40%, the short budget; the
long budget from the random init for add2), the long row for ``scaffold``, and sources.py's two-source mixture, each
source a row. The selection rule is in benchmarks/README.md ("Confidence-aware candidates and ``--objective auto``"),
committed before the comparison ran; :func:`apply_rule` is that rule.

    python benchmarks/confidence.py                 # the whole grid, resumable
    python benchmarks/confidence.py --reuse         # first check that the current code reproduces sample runs of
                                                    # signals.py / sources.py bit for bit, then reuse their nll, p and
                                                    # adaptive:token_top1 runs instead of rerunning them

Every finished run is appended to ``<out>.runs.jsonl`` as it ends, and a rerun skips the runs found there.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import torch

import signals
import sources
from common import RunLog, average_ranks, mean_se, paired_difference, rank_by_rule, weights_sha256

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT = "adaptive:token_top1"  # today's default: objective="p", objective_schedule="adaptive", signal token_top1
FIXED = ["nll", "p", "deft", "deft_cayley", "eaft:1"]
SCHEDULED = [DEFAULT, "adaptive:token_top1_clean", "token_gate:sum_sq", "progress", "adaptive:token_top1->deft"]
ELIGIBLE = FIXED + SCHEDULED
HINDSIGHT = ["linear@0.10", "linear@0.25", "linear@0.50", "linear@0.75"]

CANDIDATES = {
    **{name: dict(objective=name) for name in FIXED},
    DEFAULT: dict(objective="p", objective_schedule="adaptive", schedule_signal="token_top1"),
    "adaptive:token_top1_clean": dict(objective="p", objective_schedule="adaptive", schedule_signal="token_top1_clean"),
    "token_gate:sum_sq": dict(objective="p", objective_schedule="token_gate", schedule_token_gate="sum_sq"),
    "progress": dict(objective="p", objective_schedule="progress"),
    "adaptive:token_top1->deft": dict(objective="deft", objective_schedule="adaptive", schedule_signal="token_top1"),
    **{f"linear@{start:.2f}": dict(objective="p", objective_schedule="linear", schedule_warmup_start=start,
                                   schedule_warmup_ratio=0.25) for start in (0.10, 0.25, 0.50, 0.75)},
}
# Names whose runs in signals.py's / sources.py's runs files have exactly these settings (reusable with --reuse).
REUSABLE = ["nll", "p", DEFAULT]
MIN_SEEDS = 2  # a row enters the rule only with this many seeds common to every eligible candidate


# ------------------------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------------------------


def task_cells(families, long_families):
    cells = []
    for family in families:
        cells += [(family, b, 0.2, "short") for b in ("partial", "strong")]
        if family == "add2":
            cells += [("add2", "strong", 0.0, "short"), ("add2", "strong", 0.4, "short")]
        if family in long_families:
            cells += [(family, "none", 0.2, "long")]
    return cells


def row_name(key) -> str:
    if key[0] == "mixture":
        return f"mixture/{key[1]}"
    family, base, noise, budget = key
    return f"{family}/{base}/{noise:.0%}/{budget}"


def task_key(r):
    return (r["family"], r["base"], r["noise"], r["budget"])


def job_id(r) -> tuple:
    """What identifies a run (job or result) for resuming: task runs as signals.py keys them, mixture runs as
    sources.py does (with its set-up key)."""
    if "candidate" in r:
        return ("mixture", r["setup_key"], r["candidate"], r["seed"])
    return task_key(r) + (r["objective"], r["seed"])


def same_base(run, current_sha: str, legacy_ok: bool) -> bool:
    """Whether a recorded run trained from the base built here. Bases are pretrained again on each machine, and
    floating point differs between CPUs, so a base can come out at another strength (add2 strong: 0.826 test exact
    match on one machine, 0.74 validation on another); runs of two bases must not be averaged as seeds of one row.
    Runs recorded before bases were hashed count as this base when the base measures exactly as the row's base did
    in the previous results (``legacy_ok``)."""
    recorded = run.get("base_sha256")
    return recorded == current_sha if recorded is not None else legacy_ok


def run_job(job):
    """One run in a worker: a task row through signals.run_one, a mixture run through sources.run_one."""
    import contextlib

    if job["kind"] == "mixture":
        return sources.run_one(job)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # the Trainer's final metrics dict
        return signals.run_one(job)


# ------------------------------------------------------------------------------------------------------------------
# Cells and the selection rule
# ------------------------------------------------------------------------------------------------------------------


def collect(runs):
    """{row key: {candidate: {seed: test accuracy}}}; a mixture run gives one entry per source row."""
    acc = {}
    for r in runs:
        if "candidate" in r:
            for source, a in r["test_acc"].items():
                acc.setdefault(("mixture", source), {}).setdefault(r["candidate"], {})[r["seed"]] = a
        else:
            acc.setdefault(task_key(r), {}).setdefault(r["objective"], {})[r["seed"]] = r["test_acc"]
    return acc


def build_table(acc, row_keys, eligible=ELIGIBLE, extra=HINDSIGHT, min_seeds=MIN_SEEDS):
    """Per row: the seeds every eligible candidate completed (``seeds``), each candidate's mean and s.e. over them
    (eligible) or over its own seeds (extras), and whether the row enters the rule (every eligible candidate there,
    at least ``min_seeds`` common seeds)."""
    table = []
    for key in row_keys:
        by = acc.get(key, {})
        have = [set(by.get(c, {})) for c in eligible]
        common = sorted(set.intersection(*have)) if all(have) else []
        cells = {}
        for c in eligible:
            if common:
                xs = [by[c][s] for s in common]
                m, se = mean_se(xs)
                cells[c] = dict(mean=m, se=se, n=len(xs), accs=xs)
        for c in extra:
            if by.get(c):
                seeds = sorted(by[c])
                xs = [by[c][s] for s in seeds]
                m, se = mean_se(xs)
                cells[c] = dict(mean=m, se=se, n=len(xs), accs=xs, seeds=seeds)
        table.append(dict(row=row_name(key), key=list(key), seeds=common, results=cells,
                          in_rule=len(common) >= min_seeds and all(c in cells for c in eligible)))
    return table


def apply_rule(table, eligible=ELIGIBLE, fixed=FIXED, default=DEFAULT):
    """The rule of benchmarks/README.md ("Confidence-aware candidates and `--objective auto`").

    Per row in the rule: the best fixed objective is the fixed objective with the highest mean. A candidate is
    *behind* if the best fixed mean exceeds its own by more than sqrt(se_best^2 + se_c^2), *ahead* if its mean exceeds
    the best fixed mean by more than that. Eligible candidates (fixed objectives too) are ranked by fewest rows
    behind, then most rows ahead, then mean rank among all eligible candidates of the row (ties share their average
    rank). ``auto`` is the first-ranked candidate if it is behind in fewer rows than ``default``, or in as many but
    ahead in more; otherwise ``default``. The goal, for ``auto``: behind in no row, and in at least one row ahead of
    every fixed objective by more than their pair's combined s.e."""
    per = {c: dict(behind=[], ahead=[], ranks=[], ahead_of_every_fixed=[]) for c in eligible}
    rows_used = []
    for row in table:
        if not row["in_rule"]:
            continue
        res = row["results"]
        rows_used.append(row["row"])
        best = max(fixed, key=lambda f: res[f]["mean"])
        b = res[best]
        ranks = average_ranks({c: res[c]["mean"] for c in eligible})
        for c in eligible:
            r = res[c]
            se = math.hypot(b["se"], r["se"])
            if b["mean"] - r["mean"] > se:
                per[c]["behind"].append(row["row"])
            if r["mean"] - b["mean"] > se:
                per[c]["ahead"].append(row["row"])
            if all(r["mean"] - res[f]["mean"] > math.hypot(res[f]["se"], r["se"]) for f in fixed if f != c):
                if c not in fixed:
                    per[c]["ahead_of_every_fixed"].append(row["row"])
            per[c]["ranks"].append(ranks[c])
        row["best_fixed"] = best
    for c in eligible:
        per[c]["mean_rank"] = statistics.fmean(per[c]["ranks"]) if per[c]["ranks"] else None
        per[c]["meets_goal"] = not per[c]["behind"] and bool(per[c]["ahead_of_every_fixed"])
    ranking = rank_by_rule({c: per[c] for c in eligible})
    first = ranking[0]
    nb, nd = len(per[first]["behind"]), len(per[default]["behind"])
    better = nb < nd or (nb == nd and len(per[first]["ahead"]) > len(per[default]["ahead"]))
    auto = first if better else default
    return dict(ranking=ranking, per=per, rows_used=rows_used, first=first, auto=auto,
                auto_settings=CANDIDATES.get(auto), goal_met=per[auto]["meets_goal"])


def paired(acc, key, a, b, only=None):
    """Paired difference a - b over the seeds both completed (within ``only`` if given): (mean, s.e., n, seeds a
    ahead, seeds b ahead)."""
    xa, xb = acc.get(key, {}).get(a, {}), acc.get(key, {}).get(b, {})
    seeds = sorted(set(xa) & set(xb) & (set(only) if only else set(xa)))
    if not seeds:
        return None
    return paired_difference([xa[s] for s in seeds], [xb[s] for s in seeds])


# ------------------------------------------------------------------------------------------------------------------
# Text and plot
# ------------------------------------------------------------------------------------------------------------------


def format_text(table, verdict, acc, key_of):
    names = ELIGIBLE + HINDSIGHT
    lines = []
    for row in table:
        status = "in the rule" if row["in_rule"] else "OUTSIDE the rule (too few common seeds)"
        lines.append(f"{row['row']}  seeds {row['seeds']}  {status}" + (
            f"  best fixed: {row['best_fixed']}" if "best_fixed" in row else ""))
        best = row.get("best_fixed")
        for c in names:
            r = row["results"].get(c)
            if r is None:
                continue
            extra = ""
            if best and c != best:
                b = row["results"][best]
                extra = f"  unpaired {r['mean'] - b['mean']:+.3f} (1 s.e. {math.hypot(r['se'], b['se']):.3f})"
                pd = paired(acc, key_of[row["row"]], c, best, None if c in HINDSIGHT else row["seeds"])
                if pd:
                    extra += (f"  paired {pd['mean']:+.3f} ± {pd['se']:.3f} over {pd['n']} seeds "
                              f"({pd['a_ahead']} ahead, {pd['b_ahead']} behind)")
            lines.append(f"    {c:28s} {r['mean']:.3f} ± {r['se']:.3f} (n={r['n']}){extra}")
    lines.append("")
    lines.append(f"rows in the rule: {len(verdict['rows_used'])}: {verdict['rows_used']}")
    for i, c in enumerate(verdict["ranking"], 1):
        v = verdict["per"][c]
        mr = f"{v['mean_rank']:.2f}" if v["mean_rank"] is not None else "-"
        lines.append(f"  {i:2d}. {c:28s} behind {len(v['behind'])} {v['behind']} | ahead {len(v['ahead'])} "
                     f"{v['ahead']} | mean rank {mr} | goal: {'met' if v['meets_goal'] else 'not met'}")
    lines.append(f"first by the rule: {verdict['first']}; auto = {verdict['auto']} {verdict['auto_settings']}; "
                 f"goal {'MET' if verdict['goal_met'] else 'not met'}")
    return "\n".join(lines)


def lambda_summary(runs):
    """{row name: {candidate: (first, mid, last) lambda, mean over seeds}} of the scheduled candidates."""
    paths = {}
    for r in runs:
        name = r.get("candidate", r.get("objective"))
        if name in FIXED:
            continue
        if "candidate" in r:
            traj = r.get("lambda_trajectory") or {}
            for source, t in traj.items():
                if t:
                    paths.setdefault(f"mixture/{source}", {}).setdefault(name, []).append(
                        (t[0], t[len(t) // 2], t[-1]))
        elif r.get("lambda_path"):
            paths.setdefault(row_name(task_key(r)), {}).setdefault(name, []).append(tuple(r["lambda_path"]))
    return {row: {c: tuple(statistics.fmean(p[i] for p in ps) for i in range(3)) for c, ps in by.items()}
            for row, by in paths.items()}


def format_markdown(table, verdict, acc, key_of, lambdas=None):
    """The README's tables: every candidate per row (best fixed in bold), hindsight bounds, paired differences,
    the rule."""
    short = {"adaptive:token_top1": "default", "adaptive:token_top1_clean": "top1_clean",
             "token_gate:sum_sq": "token_gate", "adaptive:token_top1->deft": "adaptive->deft"}
    out = ["| row | n | " + " | ".join(f"`{short.get(c, c)}`" for c in ELIGIBLE) + " |",
           "|---|---|" + "---|" * len(ELIGIBLE)]
    for row in table:
        res, best = row["results"], row.get("best_fixed")
        cells = []
        for c in ELIGIBLE:
            r = res.get(c)
            text = f"{r['mean']:.3f} ± {r['se']:.3f}" if r else "-"
            cells.append(f"**{text}**" if c == best else text)
        n = len(row["seeds"]) if row["in_rule"] else f"{len(row['seeds'])} (outside)"
        out.append(f"| {row['row']} | {n} | " + " | ".join(cells) + " |")
    hind = [row for row in table if any(c in row["results"] for c in HINDSIGHT)]
    if hind:
        out += ["", "| long row (hindsight, not eligible) | " + " | ".join(f"`{c}`" for c in HINDSIGHT) + " |",
                "|---|" + "---|" * len(HINDSIGHT)]
        for row in hind:
            out.append(f"| {row['row']} | " + " | ".join(
                f"{row['results'][c]['mean']:.3f} ± {row['results'][c]['se']:.3f} (n={row['results'][c]['n']})"
                if c in row["results"] else "-" for c in HINDSIGHT) + " |")
    out += ["", "| row | best fixed | " + " | ".join(f"`{short.get(c, c)}`" for c in ELIGIBLE + HINDSIGHT) + " |",
            "|---|---|" + "---|" * len(ELIGIBLE + HINDSIGHT)]
    for row in table:
        best = row.get("best_fixed")
        if best is None:
            fixed = [f for f in FIXED if f in row["results"]]
            best = max(fixed, key=lambda f: row["results"][f]["mean"]) if fixed else None
        if best is None:
            continue
        cells = []
        for c in ELIGIBLE + HINDSIGHT:
            # eligible candidates over the row's common seeds (as the table), hindsight bounds over all they share
            d = paired(acc, key_of[row["row"]], c, best, None if c in HINDSIGHT else row["seeds"]) if c != best else None
            cells.append("-" if d is None else f"{d['mean']:+.3f} ± {d['se']:.3f} ({d['a_ahead']}/{d['b_ahead']})")
        out.append(f"| {row['row']} | `{best}` | " + " | ".join(cells) + " |")
    out += ["", "| rank | candidate | rows behind | rows ahead | mean rank | goal |", "|---|---|---|---|---|---|"]
    for i, c in enumerate(verdict["ranking"], 1):
        v = verdict["per"][c]
        mr = f"{v['mean_rank']:.2f}" if v["mean_rank"] is not None else "-"
        out.append(f"| {i} | `{c}` | {len(v['behind'])} ({', '.join(v['behind'])}) | {len(v['ahead'])} "
                   f"({', '.join(v['ahead'])}) | {mr} | {'met' if v['meets_goal'] else 'not met'} |")
    if lambdas:
        scheduled = [c for c in SCHEDULED + HINDSIGHT]
        out += ["", "| row | " + " | ".join(f"`{short.get(c, c)}`" for c in scheduled) + " |",
                "|---|" + "---|" * len(scheduled)]
        for row in table:
            lam = lambdas.get(row["row"], {})
            out.append(f"| {row['row']} | " + " | ".join(
                "/".join(f"{x:.2f}" for x in lam[c]) if c in lam else "-" for c in scheduled) + " |")
    return "\n".join(out)


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ELIGIBLE + HINDSIGHT
    fig, ax = plt.subplots(figsize=(max(10, 1.5 * len(table)), 5.2))
    width = 0.9 / len(names)
    greys = {"nll": "#bbbbbb", "p": "#333333", "deft": "#8c564b", "deft_cayley": "#c49c94", "eaft:1": "#7f7f7f"}
    colours = dict(zip(SCHEDULED + HINDSIGHT, ["#1f77b4", "#17becf", "#d62728", "#bcbd22", "#ff7f0e",
                                               "#9467bd", "#c5b0d5", "#2ca02c", "#98df8a"]))
    for i, c in enumerate(names):
        pts = [(j, row["results"][c]) for j, row in enumerate(table) if c in row["results"]]
        if not pts:
            continue
        ax.bar([j + i * width for j, _ in pts], [r["mean"] for _, r in pts], width,
               yerr=[r["se"] for _, r in pts], capsize=1, label=c,
               color=greys.get(c, colours.get(c)), hatch="//" if c in HINDSIGHT else None)
    ax.set_xticks([j + 0.45 - width / 2 for j in range(len(table))], [r["row"].replace("/", "\n", 1) for r in table],
                  fontsize=7)
    ax.set_ylabel("held-out exact match after SFT")
    ax.set_title("Confidence-aware candidates vs fixed objectives (mean ± s.e. over the row's common seeds; "
                 "hatched: hindsight bounds)", fontsize=9)
    ax.legend(fontsize=6.5, ncol=5)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------------------


def load_runs(path):
    return RunLog(path, key=job_id).runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(signals.FAMILIES), choices=list(signals.FAMILIES))
    ap.add_argument("--long-families", nargs="*", default=["add2", "scaffold"])
    ap.add_argument("--candidates", nargs="+", default=ELIGIBLE + HINDSIGHT, choices=list(CANDIDATES))
    ap.add_argument("--seeds", type=int, default=3, help="seeds per short row")
    ap.add_argument("--long-seeds", type=int, default=6, help="seeds per long row (run seed by seed)")
    ap.add_argument("--mixture-seeds", type=int, default=3)
    ap.add_argument("--no-mixture", action="store_true")
    ap.add_argument("--budgets", nargs="+", default=["short", "long"], choices=["short", "long"],
                    help="which task rows to run (the rows of other budgets are still summarised)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--long-epochs", type=float, default=24.0)
    ap.add_argument("--mixture-epochs", type=float, default=8.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--long-lr", type=float, default=3e-3)
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--mixture-n-train", type=int, default=4000, help="rows per source")
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=6000)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--summarise-only", action="store_true",
                    help="run nothing: the table, rule, JSON and PNG from the runs file as it stands")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse signals.py's and sources.py's runs of nll, p and adaptive:token_top1 after checking "
                         "that sample runs reproduce bit for bit")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "trl_prob_signals"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(HERE, "results", "confidence.json")

    torch.set_num_threads(1)
    from continuum import _quiet

    _quiet()
    from transformers import LlamaForCausalLM

    from addition import build_tokenizer, exact_match_accuracy, mean_target_probability

    t_start = time.time()
    tok = build_tokenizer()
    data_dir = tempfile.mkdtemp(prefix="confidence_data_")
    evaluation, jobs, row_keys, base_info, base_sha = {}, [], [], {}, {}
    common = dict(batch_size=args.batch_size)
    cells = task_cells(args.families, args.long_families)
    for family in args.families:
        test, val, pretrain, held = signals.splits(family, args.n_val, args.n_test)
        evaluation[family] = (val, test)
        cache, info = signals.build_bases(family, tok, val, pretrain, args)
        for key in [c for c in cells if c[0] == family]:
            _, base, noise, budget = key
            rows = signals.make_examples(family, args.n_train, noise, seed=2000 + round(noise * 100), exclude=held)
            path = os.path.join(data_dir, f"{family}_noise{noise}.json")
            with open(path, "w") as f:
                json.dump(rows, f)
            row_keys.append(key)
            base_sha[key] = weights_sha256(os.path.join(cache, base))
            model = LlamaForCausalLM.from_pretrained(os.path.join(cache, base)).eval()
            base_info[row_name(key)] = dict(
                probe_mean_p=mean_target_probability(model, tok, rows[:1000]),
                base_test_acc=exact_match_accuracy(model, tok, test,
                                                   max_new_tokens=signals.FAMILIES[family]["max_new_tokens"]),
                **info[base])
            print(f"{row_name(key):28s} {base_info[row_name(key)]}", flush=True)
            long = budget == "long"
            if budget not in args.budgets:
                continue
            names = [c for c in args.candidates if long or c not in HINDSIGHT]
            for seed in range(args.long_seeds if long else args.seeds):
                for c in names:
                    jobs.append(dict(kind="task", family=family, base=base, noise=noise, budget=budget, objective=c,
                                     options=CANDIDATES[c], seed=seed, data=path, base_dir=os.path.join(cache, base),
                                     epochs=args.long_epochs if long else args.epochs,
                                     lr=args.long_lr if long else args.lr, **common))
    setup_key = None
    if not args.no_mixture:
        margs = argparse.Namespace(n_val=args.n_val, n_test=args.n_test, n_train=args.mixture_n_train, noise=0.2)
        mtest, mtrain, (add_val, add_pretrain) = sources.make_data(margs)
        evaluation.update(mtest)  # sources.run_one reads evaluation[source]; signals.run_one evaluation[family]
        cache, info = signals.build_bases("add2", tok, add_val, add_pretrain, args)
        base_dir = os.path.join(cache, "strong")
        base = LlamaForCausalLM.from_pretrained(base_dir).eval()
        for s in sources.SOURCES:
            key = ("mixture", s)
            row_keys.append(key)
            base_sha[key] = weights_sha256(base_dir)
            srows = [r for r in mtrain if r["source"] == s]
            base_info[row_name(key)] = dict(
                base_test_acc=exact_match_accuracy(base, tok, mtest[s], max_new_tokens=sources.MAX_NEW_TOKENS),
                probe_mean_p=mean_target_probability(base, tok, srows[:1000]), **info["strong"])
            print(f"{row_name(key):28s} {base_info[row_name(key)]}", flush=True)
        path = os.path.join(data_dir, "mixture.json")
        with open(path, "w") as f:
            json.dump(mtrain, f)
        # sources.py's set-up key, so that its runs file's runs of the same set-up are recognised
        setup_key = (f"n{args.mixture_n_train}_nz0.2_ep{args.mixture_epochs}_lr{args.lr}_bs{args.batch_size}"
                     f"_test{args.n_test}_add2strong")
        for seed in range(args.mixture_seeds):
            for c in [c for c in args.candidates if c not in HINDSIGHT]:
                jobs.append(dict(kind="mixture", candidate=c, options=CANDIDATES[c], seed=seed, setup_key=setup_key,
                                 data=path, base_dir=base_dir, epochs=args.mixture_epochs, lr=args.lr, **common))

    runs_path = args.out + ".runs.jsonl"
    wanted = {job_id(j) for j in jobs}
    previous_bases = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous_bases = {row["row"]: row["base"] for row in json.load(f)["table"]}
    legacy_ok = {key: all(previous_bases.get(row_name(key), {}).get(k) == base_info[row_name(key)][k]
                          for k in ("probe_mean_p", "base_test_acc")) for key in row_keys}
    def row_of(r):
        return ("mixture", sources.SOURCES[0]) if "candidate" in r else task_key(r)

    recorded = [r for r in load_runs(runs_path) if job_id(r) in wanted]
    if args.summarise_only:  # summarise the runs file as it stands, with the bases it was run on
        done = recorded
        for key in row_keys:
            if not legacy_ok[key] and row_name(key) in previous_bases:
                base_info[row_name(key)] = previous_bases[row_name(key)]
    else:
        done = [r for r in recorded if same_base(r, base_sha[row_of(r)], legacy_ok[row_of(r)])]
        aside = {}
        for r in recorded:
            if r not in done:
                aside[row_name(row_of(r))] = aside.get(row_name(row_of(r)), 0) + 1
        for row, n in sorted(aside.items()):
            print(f"set aside: {n} runs of {row} trained from another base than the one built here (pretraining "
                  f"is not bit-identical across CPUs); they stay in {runs_path} and are neither resumed nor "
                  f"summarised. Run the whole grid on one machine.", flush=True)
    finished = {job_id(r) for r in done}
    # Order: short rows and the mixture first (seed by seed), then the long rows seed by seed, the eligible
    # candidates of a seed before its hindsight bounds, so that a partial grid covers every row.
    def order(j):
        long = j.get("budget") == "long"
        return (long, j["seed"] if long else 0, (j.get("objective") in HINDSIGHT), 0 if long else j["seed"])

    todo = sorted((j for j in jobs if job_id(j) not in finished), key=order)

    if args.summarise_only:
        todo, args.reuse = [], False
    pool = None if args.summarise_only else mp.get_context("spawn").Pool(
        args.workers, initializer=signals._init_worker, initargs=(1, evaluation))
    log = RunLog(runs_path, key=job_id)

    def record(r, note=None):
        r = dict(r, base_sha256=base_sha[row_of(r)], **(note or {}))
        done.append(r)
        finished.add(job_id(r))
        log.add(r)

    if args.reuse:
        # Only rows whose base measures exactly as it did then (probe mean p, base test accuracy) can reuse runs.
        same_base = set()
        with open(os.path.join(HERE, "results", "signals.json")) as f:
            for row in json.load(f)["table"]:
                key = (row["family"], row["base"], row["noise"], row["budget"])
                mine = base_info.get(row_name(key)) if key in row_keys else None
                if mine and all(mine[k] == row[k] for k in ("probe_mean_p", "base_test_acc")):
                    same_base.add(key)
        with open(os.path.join(HERE, "results", "sources.json")) as f:
            old_base = json.load(f)["base"]
        if not args.no_mixture and all(base_info[row_name(("mixture", s))][k] == old_base[s][k]
                                       for s in sources.SOURCES for k in ("probe_mean_p", "base_test_acc")):
            same_base.add("mixture")
        print(f"reuse: rows whose base measures as before: {sorted(map(str, same_base))}", flush=True)
        previous = {}
        for path in (os.path.join(HERE, "results", "signals.json.runs.jsonl"),
                     os.path.join(HERE, "results", "sources.json.runs.jsonl")):
            for r in load_runs(path):
                name = r.get("candidate", r.get("objective"))
                row_ok = ("mixture" if "candidate" in r else task_key(r)) in same_base
                if name in REUSABLE and job_id(r) in wanted and row_ok:
                    previous[job_id(r)] = (r, os.path.relpath(path, HERE))
        # The check: the first reusable job of each kind and name (seed 0 of the first short row, of the mixture)
        sample = []
        for name in REUSABLE:
            for kind in ("task", "mixture"):
                j = next((j for j in jobs if j["kind"] == kind and j.get("objective", j.get("candidate")) == name
                          and j.get("budget", "short") == "short" and job_id(j) in previous), None)
                if j is not None and not (kind == "mixture" and name != "p"):
                    sample.append(j)
        need = [j for j in sample if job_id(j) not in finished]
        print(f"reuse check: {len(sample)} sample runs ({len(need)} to run)", flush=True)
        for r in pool.imap_unordered(run_job, need):
            record(r, dict(reuse_check=True))
        mine = {job_id(r): r for r in done}
        same = True
        for j in sample:
            new, (old, src) = mine[job_id(j)], previous[job_id(j)]
            eq = new["test_acc"] == old["test_acc"] and new.get("val_acc") == old.get("val_acc")
            same &= eq
            print(f"  {job_id(j)}: now {new['test_acc']} / before {old['test_acc']} ({src}): "
                  f"{'identical' if eq else 'DIFFERENT'}", flush=True)
        if same:
            n = 0
            for jid, (old, src) in previous.items():
                if jid not in finished:
                    record(old, dict(reused_from=src))
                    n += 1
            print(f"reuse: every sample reproduced bit for bit; {n} runs reused", flush=True)
        else:
            print("reuse: NOT every sample reproduced; nothing reused", flush=True)
        todo = [j for j in todo if job_id(j) not in finished]

    print(f"{len(jobs)} runs planned, {len(jobs) - len(todo)} already in {runs_path}", flush=True)
    for r in (pool.imap_unordered(run_job, todo) if todo else []):  # dispatched in order: a partial grid is the one described above
        record(r)
        name = r.get("candidate", r.get("objective"))
        where = "mixture" if "candidate" in r else row_name(task_key(r))
        acc = r["test_acc"] if isinstance(r["test_acc"], dict) else {"test": r["test_acc"]}
        print(f"  [{len(done):3d}/{len(jobs)}] {where:24s} {name:28s} seed={r['seed']}: "
              + " ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f" ({r['seconds']:.0f}s)", flush=True)
    if pool is not None:
        pool.close()
        pool.join()

    acc = collect(done)
    table = build_table(acc, row_keys)
    for row in table:
        row["base"] = base_info[row["row"]]
    verdict = apply_rule(table)
    key_of = {row_name(k): k for k in row_keys}
    text = format_text(table, verdict, acc, key_of)
    markdown = format_markdown(table, verdict, acc, key_of, lambda_summary(done))
    total = time.time() - t_start
    print("\n" + text + f"\n\ntotal {total:.0f}s, {len(done)} runs")
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")}
    setup.update(command="python benchmarks/confidence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 candidates=CANDIDATES, mixture_setup_key=setup_key, torch=torch.__version__,
                 cpu_count=os.cpu_count(), total_seconds=round(total, 1), date=time.strftime("%Y-%m-%d"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(setup=setup, table=table, verdict=verdict, text=text, markdown=markdown), f, indent=1)
    with open(args.out[: -len(".json")] + ".md", "w") as f:
        f.write(markdown + "\n")
    plot(table, args.out[: -len(".json")] + ".png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
