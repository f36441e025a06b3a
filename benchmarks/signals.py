"""Which signal should the adaptive schedule follow? Candidates compared on three task families, short and long budgets.

The schedule moves from NLL to -p as a running statistic of the step's target tokens rises. Today's statistic, the mean
target p, passes the ramp once easy tokens (format, EOS, copied text) are learnt, before the few tokens that decide the
answer are (benchmarks/README.md, the longer-budget check). This benchmark makes that failure measurable and compares
signals on the same grid and seeds:

Task families (char-level tiny Llama, exact match on a clean held-out set; SFT labels carry noise):

- ``add2``: ``37+45=`` -> ``82``. Few target tokens, about half of them easy (EOS, the leading digit).
- ``scaffold``: ``37+45=`` -> `` 37 + 45 = 82``: a long easy scaffold (the operands restated, copied from the prompt)
  around a short hard answer. Mean p is dominated by easy tokens.
- ``add3``: ``123+456=`` -> ``579``: three-digit operands, many hard tokens per completion.

Bases per family along the continuum, made as ``continuum.py`` makes them (pretraining on clean data, snapshots at
measured validation accuracy; ``none`` is the random init). Rows: every family x {partial, strong} at 20% noise with
the short budget (3 epochs of 8000 examples = 188 steps); ``add2`` strong also at 0% and 40%; and the long budget
(``--long-epochs``, 8x) from the random init at 20% noise for ``add2``: the curriculum case, where NLL should teach
the task first and -p should then ignore the noise. (Short rows from the random init leave every objective near 0,
and a long ``scaffold`` row did not fit the hour on 2 cores: ``--short-bases none partial strong`` and
``--long-families add2 scaffold`` add them.)

Objectives: ``nll`` and ``p`` (the best fixed objective in every row of continuum.py's table was one of these), and
``adaptive`` toward ``p`` with each candidate signal at its registered default ramp (``trl_prob.schedules.SIGNALS``;
never tuned per row). One learning rate for every run (``--lr``), so no candidate gets a sweep the others lack.

The selection rule is in benchmarks/README.md ("Adaptive signals"), written before the comparison ran.

    python benchmarks/signals.py            # the whole grid (about an hour on 2 free CPU cores)
    python benchmarks/signals.py --quick    # a first look: add2 and scaffold, short budget, 2 seeds

Every finished run is appended to ``<out>.runs.jsonl`` as it ends, and a rerun skips the runs found there, so an
interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
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

HERE = os.path.dirname(os.path.abspath(__file__))

FAMILIES = {
    "add2": dict(digits=2, scaffold=False, max_new_tokens=6),
    "scaffold": dict(digits=2, scaffold=True, max_new_tokens=16),
    "add3": dict(digits=3, scaffold=False, max_new_tokens=7),
}
SIGNAL_CANDIDATES = ["mean", "geomean", "p25", "token_top1", "sequence_top1"]
FIXED = ["nll", "p"]
BASE_TARGETS = {"none": 0.0, "partial": 0.35, "strong": 0.7}


def objectives(signals):
    return FIXED + [f"adaptive:{s}" for s in signals]


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def make_examples(family: str, n: int, noise: float, seed: int, exclude=()) -> list[dict]:
    """Prompt-completion rows of a family; ``answer`` is the clean completion (what exact match compares)."""
    from addition import make_addition_examples

    spec = FAMILIES[family]
    rows = make_addition_examples(n, noise=noise, seed=seed, digits=spec["digits"], exclude=exclude)
    if not spec["scaffold"]:
        return rows
    out = []
    for r in rows:
        a, b = r["prompt"][:-1].split("+")
        out.append(dict(prompt=r["prompt"], completion=f" {a} + {b} = {r['completion']}",
                        answer=f" {a} + {b} = {r['answer']}", noisy=r["noisy"]))
    return out


def splits(family: str, n_val: int, n_test: int):
    test = make_examples(family, n_test, 0.0, seed=1001)
    val = make_examples(family, n_val, 0.0, seed=1002, exclude=[r["prompt"] for r in test])
    held = [r["prompt"] for r in test + val]
    pretrain = make_examples(family, 6000, 0.0, seed=1003, exclude=held)
    return test, val, pretrain, held


# ------------------------------------------------------------------------------------------------------------------
# Bases
# ------------------------------------------------------------------------------------------------------------------


def build_bases(family: str, tok, val, pretrain, args) -> tuple[str, dict]:
    """Pretrain once on clean data; snapshot each base the first time it reaches its accuracy target (cached)."""
    from addition import exact_match_accuracy, pretrain_on_task, random_tiny_llama

    cache = os.path.join(args.cache_dir, f"{family}_seed{args.base_seed}_every{args.check_every}")
    info_path = os.path.join(cache, "bases.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            return cache, json.load(f)
    os.makedirs(cache, exist_ok=True)
    max_new = FAMILIES[family]["max_new_tokens"]
    model = random_tiny_llama(seed=args.base_seed)
    pending = sorted(BASE_TARGETS.items(), key=lambda kv: kv[1])
    info, steps = {}, [0]

    def snapshot_reached(m) -> bool:
        acc = exact_match_accuracy(m, tok, val, max_new_tokens=max_new) if steps[0] else 0.0
        while pending and acc >= pending[0][1]:
            name, _ = pending.pop(0)
            m.save_pretrained(os.path.join(cache, name))
            info[name] = dict(pretrain_steps=steps[0], pretrain_val_acc=acc)
            print(f"  {family}: base {name:8s} saved at pretraining step {steps[0]:5d} (val acc {acc:.3f})", flush=True)
        steps[0] += args.check_every
        return not pending

    if not snapshot_reached(model.eval()):
        pretrain_on_task(model, tok, pretrain, steps=args.pretrain_steps, lr=3e-3, batch_size=128,
                         seed=args.base_seed, until=snapshot_reached, check_every=args.check_every)
    if pending:
        raise RuntimeError(f"{family}: pretraining never reached {pending}; raise --pretrain-steps")
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return cache, info


# ------------------------------------------------------------------------------------------------------------------
# One SFT run (in a worker process)
# ------------------------------------------------------------------------------------------------------------------

_WORKER = {}


def _init_worker(threads, evaluation):
    torch.set_num_threads(threads)
    from continuum import _quiet

    _quiet()
    from addition import build_tokenizer

    _WORKER.update(tok=build_tokenizer(), evaluation=evaluation)


def run_one(job):
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback

    from addition import exact_match_accuracy
    from trl_prob import ProbSFTTrainer
    from trl_prob.experimental import ExperimentalSFTConfig as ProbSFTConfig  # the research knobs

    tok = _WORKER["tok"]
    val, test = _WORKER["evaluation"][job["family"]]
    t0 = time.time()
    objective = job["objective"]
    if job.get("options") is not None:  # confidence.py names each candidate's ProbSFTConfig settings itself
        kwargs = dict(job["options"])
    elif objective.startswith("adaptive:"):
        kwargs = dict(objective="p", objective_schedule="adaptive", schedule_signal=objective.split(":", 1)[1])
    else:
        kwargs = dict(objective=objective)
    # Tokenize each SFT set once per worker (as continuum.py does): TRL skips its preparation for a dataset that
    # already has `input_ids`.
    processed = _WORKER.setdefault("processed", {})
    train = processed.get(job["data"])
    if train is None:
        with open(job["data"]) as f:
            rows = json.load(f)
        train = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    with tempfile.TemporaryDirectory() as out:
        config = ProbSFTConfig(
            output_dir=out, per_device_train_batch_size=job["batch_size"], num_train_epochs=job["epochs"],
            learning_rate=job["lr"], lr_scheduler_type="constant_with_warmup", warmup_steps=5, logging_steps=10_000,
            save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
            seed=job["seed"], data_seed=job["seed"], dataloader_num_workers=0, disable_tqdm=True, **kwargs,
        )  # fmt: skip
        lambdas = []

        class RecordLambda(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                lambdas.append(trainer.objective_lambda)

        trainer = ProbSFTTrainer(model=LlamaForCausalLM.from_pretrained(job["base_dir"]), args=config,
                                 train_dataset=train, processing_class=tok, callbacks=[RecordLambda()])
        processed[job["data"]] = trainer.train_dataset
        trainer.train()
        model = trainer.model.eval()
    max_new = FAMILIES[job["family"]]["max_new_tokens"]
    # Where lambda first reached 1/2 (as a share of the run): late is what the curriculum case needs.
    half = next((i for i, lam in enumerate(lambdas) if lam >= 0.5), None)
    return dict(
        {k: job[k] for k in ("family", "base", "noise", "budget", "objective", "seed")},
        val_acc=exact_match_accuracy(model, tok, val, max_new_tokens=max_new),
        test_acc=exact_match_accuracy(model, tok, test, max_new_tokens=max_new),
        lambda_path=[lambdas[0], lambdas[len(lambdas) // 2], lambdas[-1]] if lambdas else None,
        lambda_half_at=None if half is None or not lambdas else half / len(lambdas),
        steps=len(lambdas),
        seconds=time.time() - t0,
    )


# ------------------------------------------------------------------------------------------------------------------
# Summary and the selection rule
# ------------------------------------------------------------------------------------------------------------------


def summarise(runs, rows_spec, objs):
    table = []
    for row in rows_spec:
        cell = {}
        for obj in objs:
            accs = [r["test_acc"] for r in runs if _key(r) == row and r["objective"] == obj]
            if not accs:
                continue
            m, se = mean_se(accs)
            halves = [r["lambda_half_at"] for r in runs if _key(r) == row and r["objective"] == obj]
            cell[obj] = dict(mean=m, se=se, n=len(accs),
                             lambda_half_at=[h for h in halves if h is not None] and statistics.fmean(
                                 [h for h in halves if h is not None]))
        table.append(dict(zip(("family", "base", "noise", "budget"), row), results=cell))
    return table


def _key(r):
    return (r["family"], r["base"], r["noise"], r["budget"])


def verdicts(table, signals):
    """The rule of benchmarks/README.md: per candidate, rows more than one combined s.e. behind the best fixed
    objective (fewest wins), then rows more than one combined s.e. ahead of every fixed objective (most wins), then
    mean rank of test accuracy among all objectives of the row (lowest wins)."""
    per = {s: dict(behind=[], ahead=[], ranks=[]) for s in signals}
    for row in table:
        res = row["results"]
        fixed = [res[f] for f in FIXED if f in res]
        if not fixed:
            continue
        best = max(fixed, key=lambda r: r["mean"])
        order = sorted(res, key=lambda o: -res[o]["mean"])
        name = f"{row['family']}/{row['base']}/{row['noise']:.1f}/{row['budget']}"
        for s in signals:
            r = res.get(f"adaptive:{s}")
            if r is None:
                continue
            if best["mean"] - r["mean"] > math.hypot(best["se"], r["se"]):
                per[s]["behind"].append(name)
            if r["mean"] - best["mean"] > math.hypot(best["se"], r["se"]):
                per[s]["ahead"].append(name)
            per[s]["ranks"].append(order.index(f"adaptive:{s}") + 1)
    ranking = sorted(signals, key=lambda s: (len(per[s]["behind"]), -len(per[s]["ahead"]),
                                             statistics.fmean(per[s]["ranks"]) if per[s]["ranks"] else 99))
    for s in signals:
        per[s]["mean_rank"] = statistics.fmean(per[s]["ranks"]) if per[s]["ranks"] else None
        per[s]["meets_goal"] = not per[s]["behind"] and bool(per[s]["ahead"])
    return ranking, per


def format_table(table, objs, ranking, per):
    head = f"{'family':9s} {'base':8s} {'noise':>5s} {'budget':6s} " + " ".join(f"{o.removeprefix('adaptive:'):>15s}" for o in objs)
    lines = [head]
    for row in table:
        cells = []
        for o in objs:
            r = row["results"].get(o)
            cells.append(f"{r['mean']:.3f}±{r['se']:.3f}".rjust(15) if r else " " * 15)
        lines.append(f"{row['family']:9s} {row['base']:8s} {row['noise']:5.1f} {row['budget']:6s} " + " ".join(cells))
    lines.append("")
    lines.append("lambda reached 1/2 at (share of the run), adaptive candidates:")
    for row in table:
        parts = [f"{o.removeprefix('adaptive:')}={row['results'][o]['lambda_half_at']:.2f}"
                 if row["results"].get(o) and row["results"][o]["lambda_half_at"] not in (None, []) else
                 f"{o.removeprefix('adaptive:')}=never" for o in objs if o.startswith("adaptive:") and o in row["results"]]
        lines.append(f"  {row['family']}/{row['base']}/{row['noise']:.1f}/{row['budget']}: " + " ".join(parts))
    lines.append("")
    lines.append("selection (fewest rows behind the best fixed, then most rows ahead of every fixed, then mean rank):")
    for i, s in enumerate(ranking, 1):
        v = per[s]
        lines.append(f"  {i}. {s:14s} behind {len(v['behind'])} {v['behind']} | ahead {len(v['ahead'])} {v['ahead']} | "
                     f"mean rank {v['mean_rank']:.2f} | goal met: {'yes' if v['meets_goal'] else 'no'}")
    return "\n".join(lines)


def plot(table, objs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(table)), 4.8))
    width = 0.85 / len(objs)
    for i, o in enumerate(objs):
        xs = [j + i * width for j, row in enumerate(table) if o in row["results"]]
        ys = [row["results"][o]["mean"] for row in table if o in row["results"]]
        es = [row["results"][o]["se"] for row in table if o in row["results"]]
        ax.bar(xs, ys, width, yerr=es, capsize=1.5, label=o, color=None if o.startswith("adaptive") else
               {"nll": "#888888", "p": "#333333"}[o])
    ax.set_xticks([j + 0.425 - width / 2 for j in range(len(table))],
                  [f"{r['family']}\n{r['base']} {r['noise']:.0%}\n{r['budget']}" for r in table], fontsize=7)
    ax.set_ylabel("held-out exact match after SFT")
    ax.set_title("Adaptive signals vs fixed objectives (mean ± s.e. over seeds)")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="add2 and scaffold, short budget, seeds 0 1")
    ap.add_argument("--families", nargs="+", default=None, choices=list(FAMILIES))
    ap.add_argument("--signals", nargs="+", default=SIGNAL_CANDIDATES)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per short-budget row")
    ap.add_argument("--long-seeds", type=int, default=6, help="seeds per long-budget row (seed variance is large there)")
    ap.add_argument("--short-bases", nargs="+", default=["partial", "strong"], choices=list(BASE_TARGETS),
                    help="bases of the short-budget rows; from the random init the short budget leaves every "
                         "objective near 0 (continuum.py: 0.00-0.04), so those rows cannot separate signals")
    ap.add_argument("--long-families", nargs="*", default=["add2"])
    ap.add_argument("--long-epochs", type=float, default=24.0, help="8x the short budget (1512 steps)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of every short-budget run")
    ap.add_argument("--long-lr", type=float, default=3e-3,
                    help="learning rate of every long-budget run (continuum.py's longer check: NLL learns the task "
                         "from the random init within 1512 steps at 3e-3)")
    ap.add_argument("--long-first", action="store_true", help="run the long-budget rows before the short ones")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=6000)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "trl_prob_signals"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.families = args.families or ["add2", "scaffold"]
        args.seeds, args.long_families = 2, []
    args.families = args.families or list(FAMILIES)
    args.out = args.out or os.path.join(HERE, "results", "signals_quick.json" if args.quick else "signals.json")

    torch.set_num_threads(1)
    from continuum import _quiet

    _quiet()
    from addition import build_tokenizer, exact_match_accuracy, mean_target_probability
    from transformers import LlamaForCausalLM

    t_start = time.time()
    tok = build_tokenizer()
    objs = objectives(args.signals)
    data_dir = tempfile.mkdtemp(prefix="signals_data_")
    evaluation, jobs, rows_spec, base_info = {}, [], [], {}
    for family in args.families:
        test, val, pretrain, held = splits(family, args.n_val, args.n_test)
        evaluation[family] = (val, test)
        cache, info = build_bases(family, tok, val, pretrain, args)
        cells = [(b, 0.2, "short") for b in args.short_bases]
        if family == "add2" and not args.quick:
            cells += [("strong", 0.0, "short"), ("strong", 0.4, "short")]
        if family in args.long_families:
            cells += [("none", 0.2, "long")]
        for base, noise, budget in cells:
            rows = make_examples(family, args.n_train, noise, seed=2000 + round(noise * 100), exclude=held)
            path = os.path.join(data_dir, f"{family}_noise{noise}.json")
            with open(path, "w") as f:
                json.dump(rows, f)
            key = (family, base, noise, budget)
            rows_spec.append(key)
            model = LlamaForCausalLM.from_pretrained(os.path.join(cache, base)).eval()
            base_info["/".join(map(str, key))] = dict(
                probe_mean_p=mean_target_probability(model, tok, rows[:1000]),
                base_test_acc=exact_match_accuracy(model, tok, test, max_new_tokens=FAMILIES[family]["max_new_tokens"]),
                **info[base])
            print(f"{family:9s} {base:8s} noise {noise:.1f} {budget}: {base_info['/'.join(map(str, key))]}", flush=True)
            seeds = args.long_seeds if budget == "long" else args.seeds
            epochs = args.long_epochs if budget == "long" else args.epochs
            for obj in objs:
                for seed in range(seeds):
                    jobs.append(dict(family=family, base=base, noise=noise, budget=budget, objective=obj, seed=seed,
                                     data=path, base_dir=os.path.join(cache, base), batch_size=args.batch_size,
                                     epochs=epochs, lr=args.long_lr if budget == "long" else args.lr))

    runs_path = args.out + ".runs.jsonl"
    log = RunLog(runs_path, key=lambda r: (_key(r), r["objective"], r["seed"]))
    done = log.runs
    finished = {(_key(r), r["objective"], r["seed"]) for r in done}
    todo = [j for j in jobs if (_key(j), j["objective"], j["seed"]) not in finished]
    random.Random(0).shuffle(todo)  # long and short runs interleaved: partial results cover every row
    todo.sort(key=lambda j: (j["budget"] == "long") != args.long_first)  # short rows first unless --long-first
    print(f"{len(jobs)} runs planned, {len(jobs) - len(todo)} already in {runs_path}", flush=True)
    runs = [r for r in done if (_key(r), r["objective"], r["seed"]) in {(_key(j), j["objective"], j["seed"]) for j in jobs}]
    with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(1, evaluation)) as pool:
        for r in pool.imap_unordered(run_one, todo):
            runs.append(r)
            log.add(r)
            lam = f" lambda {r['lambda_path'][0]:.2f}/{r['lambda_path'][1]:.2f}/{r['lambda_path'][2]:.2f}" if r["lambda_path"] else ""
            print(f"  [{len(runs):3d}/{len(jobs)}] {r['family']:8s} {r['base']:7s} nz={r['noise']:.1f} {r['budget']:5s} "
                  f"{r['objective']:22s} seed={r['seed']}: test {r['test_acc']:.3f} ({r['seconds']:.0f}s){lam}", flush=True)

    table = summarise(runs, rows_spec, objs)
    for row in table:
        row.update(base_info["/".join(map(str, (row["family"], row["base"], row["noise"], row["budget"])))])
    ranking, per = verdicts(table, args.signals)
    text = format_table(table, objs, ranking, per)
    total = time.time() - t_start
    print("\n" + text + f"\n\ntotal {total:.0f}s, {len(runs)} runs")
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")}
    setup.update(command="python benchmarks/signals.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 torch=torch.__version__, cpu_count=os.cpu_count(), total_seconds=round(total, 1),
                 date=time.strftime("%Y-%m-%d"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(setup=setup, table=table, ranking=ranking, verdicts=per, text=text), f, indent=1)
    plot(table, objs, args.out[: -len(".json")] + ".png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
