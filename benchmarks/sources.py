"""Per-source schedules: one base, strong on one data source and weak on another, SFT'd on their mixture.

``schedule_per_source=True`` gives each data source its own adaptive lambda, read from and applied to its own target
tokens. This benchmark asks whether that buys what no single global objective can: the best fixed objective on each
source at once. Set-up (char-level tiny Llama, greedy exact match on clean held-out sets, one per source):

- source ``add``: 2-digit addition (``37+45=`` -> ``82``). The base was pretrained on clean 2-digit addition and
  snapshotted at validation exact match >= 0.7 (signals.py's ``add2`` ``strong`` base, built by the same code and
  cached in the same place): strong, where -p ignores the label noise and NLL fits it.
- source ``new``: the same problems asked with ``==`` and answered with the sum's digits reversed (``37+45==`` ->
  ``28``): the base has not learnt it (exact match 0.006): weak, where NLL learns it within the budget and -p, whose
  gradient is weighted by the small p, barely moves. (3-digit addition, tried first, was not learnt by NLL within
  750 steps of the mixture; this task needs only the tokenizer's characters.)

SFT data: ``--n-train`` rows per source, 20% label noise on both (a target replaced by a uniformly drawn wrong sum),
shuffled together. Every run has the same data, budget and learning rate (``--lr``; no per-candidate sweep).
Candidates, all through ``ProbSFTTrainer``:

- ``nll``, ``p``: the fixed objectives (the best fixed objective of every continuum.py row was one of them);
- ``adaptive``: one global adaptive schedule toward ``p`` (mean signal, the default when the rule was written; every
  other setting default), read from the whole mixture;
- ``per_source``: ``schedule_per_source=True``, mean signal, every other setting default: one lambda per source;
- ``per_source:geomean``: the same with ``schedule_signal="geomean"`` (an extra; signals.py's curriculum row found
  geomean switching later than mean);
- ``adaptive:token_top1``, ``per_source:token_top1``: the global and per-source schedules on ``token_top1``, the
  default signal since signals.py's grid (extras, added after the rule and the first 50 runs);
- ``per_source:geomean+add=1``: ``add`` pinned at lambda 1 (``schedule_source_lambda``), ``new`` on ``geomean``
  (exploratory, chosen after seeing the first 70 runs).

The selection rule is in benchmarks/README.md ("Per-source schedules"), written before the comparison ran.

    python benchmarks/sources.py            # every candidate, 10 seeds (80 runs of 504 steps, about 22 minutes
                                            # on 2 free CPU cores)
    python benchmarks/sources.py --quick    # 2 seeds

Every finished run is appended to ``<out>.runs.jsonl`` as it ends; a rerun with the same set-up skips the runs found
there, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from common import RunLog, mean_se
from signals import _WORKER, _init_worker, build_bases, make_examples, splits

HERE = os.path.dirname(os.path.abspath(__file__))

SOURCES = {"add": "37+45= -> 82", "new": "37+45== -> 28"}  # source name -> what its rows look like
MAX_NEW_TOKENS = 6  # greedy decoding budget: a 3-digit answer and the stop token fit
FIXED = ["nll", "p"]
CANDIDATES = {
    "nll": dict(objective="nll"),
    "p": dict(objective="p"),
    # the signal named, not left to the default: the rule below was written for the mean signal, the default then
    "adaptive": dict(objective="p", objective_schedule="adaptive", schedule_signal="mean"),
    "per_source": dict(objective="p", objective_schedule="adaptive", schedule_per_source=True,
                       schedule_signal="mean"),
    "per_source:geomean": dict(objective="p", objective_schedule="adaptive", schedule_per_source=True,
                               schedule_signal="geomean"),
    # Added after the rule and the first 50 runs, when token_top1 became the default signal: extras, not in the verdict.
    "adaptive:token_top1": dict(objective="p", objective_schedule="adaptive", schedule_signal="token_top1"),
    "per_source:token_top1": dict(objective="p", objective_schedule="adaptive", schedule_per_source=True,
                                  schedule_signal="token_top1"),
    # Exploratory, chosen after seeing the first 70 runs (not in the verdict): add pinned to -p, new on geomean.
    "per_source:geomean+add=1": dict(objective="p", objective_schedule="adaptive", schedule_per_source=True,
                                     schedule_signal="geomean", schedule_source_lambda={"add": 1.0}),
    # Exploratory, after all 80 runs above (not in the verdict): the default signal on add, geomean on new, with the
    # per-source signal option built for this (schedule_source_signal).
    "per_source:token_top1+new=geomean": dict(objective="p", objective_schedule="adaptive", schedule_per_source=True,
                                              schedule_signal="token_top1",
                                              schedule_source_signal={"new": "geomean"}),
}
TRAJECTORY_POINTS = 21  # lambda per source at 0%, 5%, ..., 100% of the run, kept per run for the plot


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def source_examples(source: str, n: int, noise: float, seed: int, exclude=()) -> list[dict]:
    """``n`` rows of a source, its name in ``"source"``. ``add``: ``37+45=`` -> ``82``; ``new``: ``37+45==`` -> ``28``
    (the sum's digits reversed; noisy rows reverse a wrong sum). ``exclude``: the operand pairs' prompts as ``add``
    writes them."""
    rows = make_examples("add2", n, noise, seed=seed, exclude=exclude)
    if source == "new":
        rows = [dict(r, prompt=r["prompt"] + "=", completion=r["completion"][::-1], answer=r["answer"][::-1])
                for r in rows]
    return [dict(r, source=source) for r in rows]


def make_data(args):
    """Clean held-out test rows per source, the noisy shuffled SFT mixture, and the add base's pretraining splits."""
    test, held = {}, []
    add_test, add_val, add_pretrain, add_held = splits("add2", args.n_val, args.n_test)  # signals.py's add2 splits
    test["add"] = [dict(r, source="add") for r in add_test]
    held += add_held
    test["new"] = source_examples("new", args.n_test, 0.0, seed=1004, exclude=held)
    held += [r["prompt"][:-1] for r in test["new"]]  # the operand pairs of both test sets stay out of both sources
    train = []
    for i, source in enumerate(SOURCES):
        train += source_examples(source, args.n_train, args.noise, seed=2000 + 10 * i + round(args.noise * 100),
                                 exclude=held)
    random.Random(0).shuffle(train)  # warm start measures the first rows: every source must be among them
    return test, train, (add_val, add_pretrain)


# ------------------------------------------------------------------------------------------------------------------
# One SFT run (in a worker process)
# ------------------------------------------------------------------------------------------------------------------


def _trajectory(values):
    if not values:
        return None
    idx = [round(i * (len(values) - 1) / (TRAJECTORY_POINTS - 1)) for i in range(TRAJECTORY_POINTS)]
    return [values[i] for i in idx]


def run_one(job):
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    from addition import exact_match_accuracy
    from trl_prob import ProbSFTTrainer
    from trl_prob.experimental import ExperimentalSFTConfig as ProbSFTConfig  # the research knobs

    tok, test = _WORKER["tok"], _WORKER["evaluation"]  # signals.py's worker state: one initialiser for both
    t0 = time.time()
    options = job.get("options") or CANDIDATES[job["candidate"]]  # confidence.py passes its own candidates
    per_source = options.get("schedule_per_source", False)
    columns = ("prompt", "completion", "source") if per_source else ("prompt", "completion")
    processed = _WORKER.setdefault("processed", {})  # tokenized once per worker and column set (as continuum.py)
    train = processed.get((job["data"], columns))
    if train is None:
        with open(job["data"]) as f:
            rows = json.load(f)
        train = Dataset.from_list([{k: r[k] for k in columns} for r in rows])
    with tempfile.TemporaryDirectory() as out:
        config = ProbSFTConfig(
            output_dir=out, per_device_train_batch_size=job["batch_size"], num_train_epochs=job["epochs"],
            learning_rate=job["lr"], lr_scheduler_type="constant_with_warmup", warmup_steps=5, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
            seed=job["seed"], data_seed=job["seed"], dataloader_num_workers=0, disable_tqdm=True, **options,
        )  # fmt: skip
        trainer = ProbSFTTrainer(model=LlamaForCausalLM.from_pretrained(job["base_dir"]), args=config,
                                 train_dataset=train, processing_class=tok)
        processed[(job["data"], columns)] = trainer.train_dataset
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # one log line per step
            trainer.train()
        model = trainer.model.eval()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # The lambda each step trained with, from the logged metrics: objective_lambda/<source> per source, or the one
    # global objective_lambda for both.
    lambdas, probs = {}, {}
    for source in SOURCES:
        key = f"objective_lambda/{source}" if per_source else "objective_lambda"
        lambdas[source] = _trajectory([e[key] for e in logs if key in e])
        probs[source] = _trajectory([e[f"mean_token_prob/{source}"] for e in logs if f"mean_token_prob/{source}" in e])
    return dict(
        {k: job[k] for k in ("candidate", "seed", "setup_key")},
        schedule_signal=config.schedule_signal if config.objective_schedule == "adaptive" else None,
        test_acc={s: exact_match_accuracy(model, tok, test[s], max_new_tokens=MAX_NEW_TOKENS) for s in SOURCES},
        lambda_trajectory=lambdas if any(v is not None for v in lambdas.values()) else None,
        mean_p_trajectory=probs if any(v is not None for v in probs.values()) else None,
        steps=trainer.state.global_step,
        seconds=time.time() - t0,
    )


# ------------------------------------------------------------------------------------------------------------------
# Summary and the selection rule
# ------------------------------------------------------------------------------------------------------------------


def summarise(runs, candidates):
    table = {}
    for c in candidates:
        mine = sorted((r for r in runs if r["candidate"] == c), key=lambda r: r["seed"])
        if not mine:
            continue
        row = dict(n=len(mine), seeds=[r["seed"] for r in mine])
        for s in SOURCES:
            accs = [r["test_acc"][s] for r in mine]
            m, se = mean_se(accs)
            row[s] = dict(mean=m, se=se, accs=accs)
        paths = [r["lambda_trajectory"] for r in mine if r["lambda_trajectory"]]
        if paths:
            traj = {s: [statistics.fmean(p[s][i] for p in paths) for i in range(TRAJECTORY_POINTS)] for s in SOURCES}
            row["lambda_trajectory"] = traj
            row["lambda_first_mid_last"] = {s: [t[0], t[TRAJECTORY_POINTS // 2], t[-1]] for s, t in traj.items()}
        table[c] = row
    return table


def verdict(table):
    """The rule of benchmarks/README.md ("Per-source schedules"): a candidate *matches* a source when the best fixed
    objective's mean there exceeds its own by at most one combined standard error sqrt(se_best^2 + se_c^2); it meets
    the goal when it matches every source. The set-up *separates* when on each source the other fixed objective is
    behind that source's best by more than one combined standard error (no fixed objective matches both)."""
    out = dict(best_fixed={}, candidates={})
    for s in SOURCES:
        fixed = {f: table[f][s] for f in FIXED if f in table}
        if not fixed:
            return None
        best = max(fixed, key=lambda f: fixed[f]["mean"])
        out["best_fixed"][s] = best
    for c, row in table.items():
        gaps = {}
        for s in SOURCES:
            b = table[out["best_fixed"][s]][s]
            gaps[s] = dict(gap=b["mean"] - row[s]["mean"], combined_se=math.hypot(b["se"], row[s]["se"]))
            gaps[s]["matches"] = gaps[s]["gap"] <= gaps[s]["combined_se"]
        out["candidates"][c] = dict(sources=gaps, meets_goal=all(g["matches"] for g in gaps.values()),
                                    mean_over_sources=statistics.fmean(row[s]["mean"] for s in SOURCES))
    out["setup_separates"] = (
        len(set(out["best_fixed"].values())) == len(SOURCES)
        and all(not out["candidates"][f]["meets_goal"] for f in FIXED if f in out["candidates"])
    )
    return out


def format_table(table, v):
    cols = list(SOURCES)
    lines = [f"{'candidate':25s} " + " ".join(f"{s + ' exact match':>17s}" for s in cols)
             + "   " + "   ".join(f"lambda {s} first/mid/last" for s in cols) + "   goal met"]
    for c, row in table.items():
        cells = " ".join(f"{row[s]['mean']:.3f} ± {row[s]['se']:.3f}".rjust(17) for s in cols)
        lam = row.get("lambda_first_mid_last")
        lam_text = "   ".join(("/".join(f"{x:.2f}" for x in lam[s]) if lam else "-").ljust(26) for s in cols)
        met = "" if v is None else ("yes" if v["candidates"][c]["meets_goal"] else "no")
        lines.append(f"{c:25s} {cells}   {lam_text}   {met}")
    if v is not None:
        lines.append("")
        lines.append("best fixed objective per source: " + ", ".join(f"{s}: {f}" for s, f in v["best_fixed"].items())
                     + f"; the set-up separates the fixed objectives: {'yes' if v['setup_separates'] else 'NO'}")
        for c, cv in v["candidates"].items():
            parts = [f"{s} gap {g['gap']:+.3f} vs 1 s.e. {g['combined_se']:.3f} "
                     f"({'matches' if g['matches'] else 'BEHIND'})" for s, g in cv["sources"].items()]
            lines.append(f"  {c:25s} " + " | ".join(parts))
    return "\n".join(lines)


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw=dict(width_ratios=[1.1, 1]))
    cands = list(table)
    colors = {"nll": "#888888", "p": "#333333"}
    colors.update({c: f"C{k}" for k, c in enumerate(c for c in cands if c not in colors)})
    width = 0.8 / len(cands)
    for i, c in enumerate(cands):
        xs = [j + i * width for j in range(len(SOURCES))]
        ax.bar(xs, [table[c][s]["mean"] for s in SOURCES], width, yerr=[table[c][s]["se"] for s in SOURCES],
               capsize=2, label=c, color=colors[c])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SOURCES))], [f"{s}: {SOURCES[s]}" for s in SOURCES])
    ax.set_ylabel("held-out exact match after SFT")
    ax.set_title("Mixture SFT: accuracy per source (mean ± s.e. over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    styles = {"add": "-", "new": "--"}
    xs = [i / (TRAJECTORY_POINTS - 1) for i in range(TRAJECTORY_POINTS)]
    for c in cands:
        if "lambda_trajectory" not in table[c]:
            continue
        for s in SOURCES:
            ax2.plot(xs, table[c]["lambda_trajectory"][s], styles.get(s, ":"), color=colors[c], label=f"{c} / {s}")
    ax2.set_xlabel("share of the run")
    ax2.set_ylabel("lambda (1 = pure -p)")
    ax2.set_title("lambda per source, mean over seeds (global adaptive: one lambda)", fontsize=9)
    ax2.set_ylim(-0.03, 1.03)
    ax2.legend(fontsize=6.5, loc="center right", bbox_to_anchor=(1.0, 0.72))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--epochs", type=float, default=8.0, help="over both sources' rows: 504 steps at the defaults")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of every run")
    ap.add_argument("--noise", type=float, default=0.2, help="label noise of both sources' SFT rows")
    ap.add_argument("--n-train", type=int, default=4000, help="SFT rows per source")
    ap.add_argument("--n-val", type=int, default=300, help="clean validation rows of add (base snapshots only)")
    ap.add_argument("--n-test", type=int, default=500, help="clean held-out rows per source")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--base", default=None, help="a model directory to use as the base instead of building add2 strong")
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=6000)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "trl_prob_signals"),
                    help="where bases are cached (shared with signals.py: the same add2 bases)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds = 2
    args.out = args.out or os.path.join(HERE, "results", "sources_quick.json" if args.quick else "sources.json")

    torch.set_num_threads(1)
    from continuum import _quiet

    _quiet()
    from transformers import LlamaForCausalLM

    from addition import build_tokenizer, exact_match_accuracy, mean_target_probability

    t_start = time.time()
    tok = build_tokenizer()
    test, train, (add_val, add_pretrain) = make_data(args)
    if args.base is None:
        cache, info = build_bases("add2", tok, add_val, add_pretrain, args)
        base_dir, base_info = os.path.join(cache, "strong"), dict(info["strong"])
    else:
        base_dir, base_info = args.base, {}
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    for s in SOURCES:
        rows = [r for r in train if r["source"] == s]
        base_info[s] = dict(
            base_test_acc=exact_match_accuracy(base, tok, test[s], max_new_tokens=MAX_NEW_TOKENS),
            probe_mean_p=mean_target_probability(base, tok, rows[:1000]))
    print(f"base {base_dir}: {base_info}", flush=True)
    data_dir = tempfile.mkdtemp(prefix="sources_data_")
    data = os.path.join(data_dir, "train.json")
    with open(data, "w") as f:
        json.dump(train, f)

    # Runs are resumed only under the same set-up (data, budget, learning rate, base).
    setup_key = f"n{args.n_train}_nz{args.noise}_ep{args.epochs}_lr{args.lr}_bs{args.batch_size}_test{args.n_test}_" + (
        "add2strong" if args.base is None else os.path.abspath(args.base))
    jobs = [dict(candidate=c, seed=seed, setup_key=setup_key, data=data, base_dir=base_dir, batch_size=args.batch_size,
                 epochs=args.epochs, lr=args.lr) for c in args.candidates for seed in range(args.seeds)]
    runs_path = args.out + ".runs.jsonl"
    log = RunLog(runs_path, key=lambda r: (r.get("setup_key"), r["candidate"], r["seed"]))
    done = list(log.runs)
    wanted = {(j["candidate"], j["seed"]) for j in jobs}
    runs = [r for r in done if r.get("setup_key") == setup_key and (r["candidate"], r["seed"]) in wanted]
    finished = {(r["candidate"], r["seed"]) for r in runs}
    todo = [j for j in jobs if (j["candidate"], j["seed"]) not in finished]
    todo.sort(key=lambda j: j["seed"])  # seed by seed: a partial result covers every candidate
    print(f"{len(jobs)} runs planned, {len(jobs) - len(todo)} already in {runs_path}", flush=True)
    if todo:
        with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(1, test)) as pool:
            for r in pool.imap_unordered(run_one, todo):
                runs.append(r)
                log.add(r)
                lam = ""
                if r["lambda_trajectory"]:
                    lam = " lambda " + " ".join(f"{s} {t[0]:.2f}/{t[TRAJECTORY_POINTS // 2]:.2f}/{t[-1]:.2f}"
                                                for s, t in r["lambda_trajectory"].items())
                acc = " ".join(f"{s} {a:.3f}" for s, a in r["test_acc"].items())
                print(f"  [{len(runs):3d}/{len(jobs)}] {r['candidate']:25s} seed={r['seed']}: {acc} "
                      f"({r['seconds']:.0f}s, {r['steps']} steps){lam}", flush=True)

    table = summarise(runs, args.candidates)
    v = verdict(table)
    text = format_table(table, v)
    total = time.time() - t_start
    print("\n" + text + f"\n\ntotal {total:.0f}s, {len(runs)} runs")
    setup = {k: val for k, val in vars(args).items() if k not in ("out", "cache_dir")}
    setup.update(command="python benchmarks/sources.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 sources=SOURCES, candidates={c: CANDIDATES[c] for c in args.candidates}, setup_key=setup_key,
                 torch=torch.__version__, cpu_count=os.cpu_count(), total_seconds=round(total, 1),
                 date=time.strftime("%Y-%m-%d"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(setup=setup, base=base_info, table=table, verdict=v, text=text), f, indent=1)
    plot(table, args.out[: -len(".json")] + ".png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
