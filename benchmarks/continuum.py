"""The capability continuum of "Beyond Log Likelihood" in miniature, trained through ``ProbSFTTrainer`` itself.

Task family: 2-digit addition (``"37+45="`` -> ``"82"``), exact match on a clean held-out test set; the SFT data
carries label noise (a share of targets replaced by a uniformly drawn wrong sum), which is what the paper's theory is
about. Base models at several places on the continuum are made by pretraining one tiny Llama on *clean* addition and
snapshotting it the first time its measured validation accuracy reaches each target (``none`` is the random init).
Each base is then SFT'd with ``nll``, ``p``, ``power:10``, ``top_p:0.2`` and ``adaptive`` (``objective="p"``,
``objective_schedule="adaptive"`` with its defaults, not tuned per row): the same data and budget for all, a
learning-rate sweep whose winner is chosen per (base, noise, objective) on a clean validation split (mean over seeds),
and several seeds. The table reports held-out accuracy (mean +- standard error over seeds) with each base's probe
value (mean target-token p on the SFT data) beside it; the plot shows accuracy against that probe value.

    python benchmarks/continuum.py            # the whole table (README), 2 worker processes on 2 CPU cores
    python benchmarks/continuum.py --quick    # a smaller grid for a first look

Bases are cached under ``--cache-dir`` (rebuilt when the pretraining settings change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

from common import mean_se

HERE = os.path.dirname(os.path.abspath(__file__))
OBJECTIVES = ["nll", "p", "power:10", "top_p:0.2", "adaptive"]
# Clean-validation accuracy at which each base is snapshotted during one pretraining run ("none" is the random init).
# Addition is learnt in a jump (0.1 -> 0.8 within ~300 steps), so a base's measured accuracy can overshoot its target:
# the table reports the measured value. "weak" is off by default (its probe value sits beside "partial"'s).
BASE_TARGETS = {"none": 0.0, "faint": 0.02, "weak": 0.1, "partial": 0.35, "strong": 0.7}
DEFAULT_BASES = ["none", "faint", "partial", "strong"]


def _quiet():
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def _config_option(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` for ProbSFTConfig; the value is read as JSON when it parses (numbers, true/false)."""
    from trl_prob.experimental import ExperimentalSFTConfig as ProbSFTConfig  # the research knobs

    field, sep, value = text.partition("=")
    if not sep or field not in ProbSFTConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with a ProbSFTConfig field, got {text!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def make_splits(args):
    from addition import make_addition_examples

    test = make_addition_examples(args.n_test, noise=0.0, seed=1001)
    val = make_addition_examples(args.n_val, noise=0.0, seed=1002, exclude=[r["prompt"] for r in test])
    held = [r["prompt"] for r in test + val]
    pretrain = make_addition_examples(6000, noise=0.0, seed=1003, exclude=held)
    return test, val, pretrain, held


def build_bases(tok, val, pretrain, args) -> tuple[str, dict]:
    """Pretrain once on clean data, snapshot each base the first time it reaches its target; returns (dir, info)."""
    from addition import exact_match_accuracy, pretrain_on_task, random_tiny_llama

    targets = {b: BASE_TARGETS[b] for b in args.bases}
    key = "_".join(f"{b}{t}" for b, t in sorted(targets.items(), key=lambda kv: kv[1]))
    cache = os.path.join(args.cache_dir, f"seed{args.base_seed}_{key}_every{args.check_every}")
    info_path = os.path.join(cache, "bases.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            return cache, json.load(f)
    os.makedirs(cache, exist_ok=True)
    model = random_tiny_llama(seed=args.base_seed)
    info = {}
    pending = sorted(targets.items(), key=lambda kv: kv[1])
    steps = [0]

    def snapshot_reached(m) -> bool:
        acc = exact_match_accuracy(m, tok, val) if steps[0] or pending[0][1] > 0 else 0.0
        while pending and acc >= pending[0][1]:
            name, _ = pending.pop(0)
            m.save_pretrained(os.path.join(cache, name))
            info[name] = dict(pretrain_steps=steps[0], pretrain_val_acc=acc)
            print(f"  base {name:8s} saved at pretraining step {steps[0]:5d} (val acc {acc:.3f})", flush=True)
        steps[0] += args.check_every
        return not pending

    t0 = time.time()
    if not snapshot_reached(model.eval()):  # step 0: the random init
        pretrain_on_task(model, tok, pretrain, steps=args.pretrain_steps, lr=3e-3, batch_size=128,
                         seed=args.base_seed, until=snapshot_reached, check_every=args.check_every)
    if pending:
        raise RuntimeError(f"pretraining never reached {pending}; raise --pretrain-steps")
    print(f"  pretraining took {time.time() - t0:.0f}s", flush=True)
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return cache, info


# ------------------------------------------------------------------------------------------------------------------
# One SFT run (in a worker process)
# ------------------------------------------------------------------------------------------------------------------

_WORKER = {}


def _init_worker(threads, val, test):
    torch.set_num_threads(threads)
    _quiet()
    from addition import build_tokenizer

    _WORKER.update(tok=build_tokenizer(), val=val, test=test, processed={})


def run_one(job):
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback

    from trl_prob import ProbSFTTrainer

    from trl_prob.experimental import ExperimentalSFTConfig as ProbSFTConfig  # the research knobs
    from addition import exact_match_accuracy

    tok, val, test = _WORKER["tok"], _WORKER["val"], _WORKER["test"]
    t0 = time.time()
    objective = job["objective"]
    if objective == "adaptive":
        kwargs = dict(objective="p", objective_schedule="adaptive", **job["adaptive_options"])
    else:
        kwargs = dict(objective=objective)
    with tempfile.TemporaryDirectory() as out:
        config = ProbSFTConfig(
            output_dir=out,
            per_device_train_batch_size=job["batch_size"],
            num_train_epochs=job["epochs"],
            learning_rate=job["lr"],
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=5,
            logging_steps=10_000,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            seed=job["seed"],
            data_seed=job["seed"],
            dataloader_num_workers=0,
            disable_tqdm=True,
            **kwargs,
        )
        lambdas = []

        class RecordLambda(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                lambdas.append(trainer.objective_lambda)

        # Tokenize each SFT set once per worker: TRL skips its preparation for a dataset that has `input_ids`.
        train_ds = _WORKER["processed"].get(job["data"])
        if train_ds is None:
            with open(job["data"]) as f:
                rows = json.load(f)
            train_ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        model = LlamaForCausalLM.from_pretrained(job["base_dir"])
        trainer = ProbSFTTrainer(model=model, args=config, train_dataset=train_ds, processing_class=tok,
                                 callbacks=[RecordLambda()])
        _WORKER["processed"][job["data"]] = trainer.train_dataset
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # the Trainer's final metrics dict
            trainer.train()
        model = trainer.model.eval()
    return dict(
        {k: job[k] for k in ("base", "noise", "objective", "lr", "seed")},
        val_acc=exact_match_accuracy(model, tok, val),
        test_acc=exact_match_accuracy(model, tok, test),
        # The schedule's weight on the prior-leaning objective: first step, middle, last (1.0 = pure -p).
        lambda_path=[lambdas[0], lambdas[len(lambdas) // 2], lambdas[-1]] if objective == "adaptive" else None,
        steps=len(lambdas) if lambdas else None,
        seconds=time.time() - t0,
    )


# ------------------------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------------------------


def best_learning_rates(first_runs, k):
    """{(base, noise, objective, lr)} of the k learning rates with the best validation accuracy per group."""
    groups = {}
    for r in first_runs:
        groups.setdefault((r["base"], r["noise"], r["objective"]), []).append(r)
    return {key + (r["lr"],) for key, group in groups.items()
            for r in sorted(group, key=lambda r: (-r["val_acc"], r["lr"]))[:k]}


def summarise(runs, cells, args, base_info):
    rows = []
    for b, nz in cells:
        for obj in args.objectives:
            by_lr = {lr: [r for r in runs if (r["base"], r["noise"], r["objective"], r["lr"]) == (b, nz, obj, lr)]
                     for lr in args.lrs}
            # Only learning rates run with every seed compete (the finalists of successive halving).
            complete = [lr for lr in args.lrs if len(by_lr[lr]) == len(args.seeds)]
            best_lr = max(complete, key=lambda lr: (statistics.fmean(r["val_acc"] for r in by_lr[lr]), -lr))
            chosen = by_lr[best_lr]
            m, se = mean_se([r["test_acc"] for r in chosen])
            row = dict(base=b, noise=nz, objective=obj, lr=best_lr, test_acc_mean=m, test_acc_se=se,
                       val_acc_mean=statistics.fmean(r["val_acc"] for r in chosen), **base_info[(b, nz)])
            if obj == "adaptive":
                paths = [r["lambda_path"] for r in chosen]
                row["lambda_path_mean"] = [statistics.fmean(p[i] for p in paths) for i in range(3)]
            rows.append(row)

    verdicts = []
    for b, nz in cells:
        cell = [r for r in rows if (r["base"], r["noise"]) == (b, nz)]
        fixed = [r for r in cell if r["objective"] != "adaptive"]
        ada = next((r for r in cell if r["objective"] == "adaptive"), None)
        if not fixed or ada is None:
            continue
        best = max(fixed, key=lambda r: r["test_acc_mean"])
        worst = min(fixed, key=lambda r: r["test_acc_mean"])
        se = math.hypot(ada["test_acc_se"], best["test_acc_se"])
        verdicts.append(dict(
            base=b, noise=nz, best_fixed=best["objective"], best_fixed_acc=best["test_acc_mean"],
            worst_fixed=worst["objective"], worst_fixed_acc=worst["test_acc_mean"], adaptive_acc=ada["test_acc_mean"],
            combined_se=se,
            adaptive_within_1se_of_best=bool(best["test_acc_mean"] - ada["test_acc_mean"] <= se),
            adaptive_ahead_of_worst=bool(ada["test_acc_mean"] - worst["test_acc_mean"]
                                         > math.hypot(ada["test_acc_se"], worst["test_acc_se"])),
            adaptive_beats_every_fixed=bool(ada["test_acc_mean"] > best["test_acc_mean"]),
        ))
    return rows, verdicts


def format_table(rows, verdicts, total, n_runs):
    lines = [f"{'base':8s} {'noise':>5s} {'probe p':>7s} {'base acc':>8s}  {'objective':10s} {'lr':>6s} "
             f"{'test acc':>8s} {'s.e.':>6s}  lambda (first/mid/last)"]
    for r in rows:
        lam = "/".join(f"{x:.2f}" for x in r["lambda_path_mean"]) if "lambda_path_mean" in r else ""
        lines.append(f"{r['base']:8s} {r['noise']:5.1f} {r['probe_mean_p']:7.3f} {r['base_test_acc']:8.3f}  "
                     f"{r['objective']:10s} {r['lr']:6.0e} {r['test_acc_mean']:8.3f} {r['test_acc_se']:6.3f}  {lam}")
    lines.append("")
    for v in verdicts:
        lines.append(
            f"{v['base']:8s} nz={v['noise']:.1f}: adaptive {v['adaptive_acc']:.3f} | best fixed {v['best_fixed']} "
            f"{v['best_fixed_acc']:.3f} (within 1 s.e.: {'yes' if v['adaptive_within_1se_of_best'] else 'NO'}; "
            f"beats all: {'yes' if v['adaptive_beats_every_fixed'] else 'no'}) | worst fixed {v['worst_fixed']} "
            f"{v['worst_fixed_acc']:.3f} (clearly ahead: {'yes' if v['adaptive_ahead_of_worst'] else 'NO'})")
    lines.append(f"total {total:.0f}s, {n_runs} SFT runs")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    noise0 = rows[0]["noise"]
    strong_noise = sorted({r["noise"] for r in rows if r["base"] == "strong"})
    fig, axes = plt.subplots(1, 2 if len(strong_noise) > 1 else 1, figsize=(12 if len(strong_noise) > 1 else 6.5, 4.6),
                             squeeze=False)
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    ax = axes[0, 0]
    # The weak end sits near 0 on the full scale, so it is repeated in an inset with its own y range.
    inset = ax.inset_axes([0.08, 0.47, 0.42, 0.4])
    for target in (ax, inset):
        for obj in objectives:
            pts = sorted((r["probe_mean_p"], r["test_acc_mean"], r["test_acc_se"]) for r in rows
                         if r["objective"] == obj and r["noise"] == noise0)
            xs, ys, es = zip(*pts)
            target.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=obj, lw=2.8 if obj == "adaptive" else 1.2,
                            color="black" if obj == "adaptive" else None, ms=4)
    weak = [r for r in rows if r["noise"] == noise0 and r["probe_mean_p"] < 0.55]
    if weak:
        inset.set_xlim(min(r["probe_mean_p"] for r in weak) - 0.03, max(r["probe_mean_p"] for r in weak) + 0.03)
        inset.set_ylim(-0.005, max(r["test_acc_mean"] + r["test_acc_se"] for r in weak) * 1.15 + 0.005)
        inset.set_title("weak end, zoomed", fontsize=8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
    else:
        inset.remove()
    for r in rows:
        if r["objective"] == objectives[0] and r["noise"] == noise0:
            ax.annotate(r["base"], (r["probe_mean_p"], 1.0), xycoords=("data", "axes fraction"),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8, color="gray")
    ax.set_xlabel(f"base probe: mean target-token p on the SFT data ({noise0:.0%} noise)")
    ax.set_ylabel("held-out exact match after SFT")
    ax.set_title("Capability continuum in miniature (ProbSFTTrainer)", pad=16)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    if len(strong_noise) > 1:
        ax = axes[0, 1]
        width = 0.8 / len(objectives)
        for i, obj in enumerate(objectives):
            vals = [next(r for r in rows if (r["base"], r["noise"], r["objective"]) == ("strong", nz, obj))
                    for nz in strong_noise]
            ax.bar([j + i * width for j in range(len(strong_noise))], [v["test_acc_mean"] for v in vals], width,
                   yerr=[v["test_acc_se"] for v in vals], capsize=2, label=obj,
                   color="black" if obj == "adaptive" else None)
        base_acc = next(r["base_test_acc"] for r in rows if r["base"] == "strong")
        ax.axhline(base_acc, color="gray", ls="--", lw=1, label="strong base, before SFT")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(strong_noise))], [f"{nz:.0%}" for nz in strong_noise])
        ax.set_xlabel("label noise in the SFT data (strong base)")
        ax.set_ylabel("held-out exact match after SFT")
        ax.set_title("Noise: strong base")
        ax.set_ylim(0, 1.15)
        ax.legend(fontsize=8, ncol=3, loc="upper center")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller grid: 20%% noise only, learning rates 3e-4 1e-3, seeds 0 1 (about 5 minutes)")
    ap.add_argument("--noise", type=float, nargs="+", default=None,
                    help="SFT label-noise levels: the first for every base, the rest on the strong base only")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--lrs", type=float, nargs="+", default=None)
    ap.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    ap.add_argument("--bases", nargs="+", default=DEFAULT_BASES, choices=list(BASE_TARGETS))
    ap.add_argument("--n-train", type=int, default=8000,
                    help="SFT examples (a small set leaves the weak end at floor accuracy)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=3000)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--finalists", type=int, default=2,
                    help="learning rates per (base, noise, objective) that get the remaining seeds after a first "
                         "round with one seed (0: every learning rate with every seed)")
    ap.add_argument("--adaptive-option", type=_config_option, action="append", default=[], metavar="FIELD=VALUE",
                    help="a ProbSFTConfig field for the adaptive runs, e.g. schedule_signal=median (repeatable; "
                         "the table's adaptive uses the defaults)")
    ap.add_argument("--workers", type=int, default=2, help="SFT runs in parallel (one CPU thread each)")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "trl_prob_continuum"))
    ap.add_argument("--out", default=None, help="JSON path (PNG beside it)")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the PNG of an earlier run's JSON and exit")
    args = ap.parse_args(argv)
    args.adaptive_option = dict(args.adaptive_option)
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f)["summary"], args.plot_only[: -len(".json")] + ".png")
        return
    args.noise = args.noise or ([0.2] if args.quick else [0.2, 0.0, 0.4])
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    args.lrs = args.lrs or ([3e-4, 1e-3] if args.quick else [1e-4, 3e-4, 1e-3, 3e-3])
    args.out = args.out or os.path.join(HERE, "results", "continuum_quick.json" if args.quick else "continuum.json")

    torch.set_num_threads(1)
    _quiet()
    from addition import build_tokenizer, exact_match_accuracy, make_addition_examples, mean_target_probability
    from transformers import LlamaForCausalLM

    t_start = time.time()
    tok = build_tokenizer()
    test, val, pretrain, held = make_splits(args)
    cache, pretrain_info = build_bases(tok, val, pretrain, args)

    # (base, noise) cells: the first noise level on every base, the others on the strong base only.
    cells = [(b, args.noise[0]) for b in args.bases]
    if "strong" in args.bases:
        cells += [("strong", nz) for nz in args.noise[1:]]
    data_dir = tempfile.mkdtemp(prefix="continuum_data_")
    base_info, base_models, base_scores, jobs = {}, {}, {}, []
    for b, nz in cells:
        rows = make_addition_examples(args.n_train, noise=nz, seed=2000 + round(nz * 100), exclude=held)
        path = os.path.join(data_dir, f"train_noise{nz}.json")
        with open(path, "w") as f:
            json.dump(rows, f)
        if b not in base_models:  # the strong base serves several noise levels: load and score it once
            base_models[b] = LlamaForCausalLM.from_pretrained(os.path.join(cache, b)).eval()
            base_scores[b] = dict(base_val_acc=exact_match_accuracy(base_models[b], tok, val),
                                  base_test_acc=exact_match_accuracy(base_models[b], tok, test), **pretrain_info[b])
        base_info[(b, nz)] = dict(probe_mean_p=mean_target_probability(base_models[b], tok, rows), **base_scores[b])
        print(f"base {b:8s} noise {nz:.1f}: probe mean p {base_info[(b, nz)]['probe_mean_p']:.3f}, "
              f"test acc {base_info[(b, nz)]['base_test_acc']:.3f}", flush=True)
        for obj in args.objectives:
            for lr in args.lrs:
                jobs.append(dict(base=b, noise=nz, objective=obj, lr=lr, data=path, base_dir=os.path.join(cache, b),
                                 batch_size=args.batch_size, epochs=args.epochs,
                                 adaptive_options=args.adaptive_option))

    # Successive halving: every learning rate with the first seed, then the other seeds for the `--finalists`
    # learning rates with the best validation accuracy in each (base, noise, objective). The winner among the
    # finalists is then chosen on validation accuracy averaged over all seeds.
    finalists = args.finalists or len(args.lrs)
    planned = len(jobs) + len(jobs) // len(args.lrs) * min(finalists, len(args.lrs)) * (len(args.seeds) - 1)
    runs = []

    def run_round(pool, batch):
        for r in pool.imap_unordered(run_one, batch):
            runs.append(r)
            lam = f" lambda {r['lambda_path'][0]:.2f}->{r['lambda_path'][-1]:.2f}" if r["lambda_path"] else ""
            print(f"  [{len(runs):3d}/{planned}] {r['base']:8s} nz={r['noise']:.1f} {r['objective']:10s} "
                  f"lr={r['lr']:.0e} seed={r['seed']}: val {r['val_acc']:.3f} test {r['test_acc']:.3f} "
                  f"({r['seconds']:.1f}s){lam}", flush=True)

    with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(1, val, test)) as pool:
        run_round(pool, [dict(job, seed=args.seeds[0]) for job in jobs])
        if len(args.seeds) > 1:
            chosen = best_learning_rates(runs, finalists)
            run_round(pool, [dict(job, seed=seed) for job in jobs for seed in args.seeds[1:]
                             if (job["base"], job["noise"], job["objective"], job["lr"]) in chosen])

    rows, verdicts = summarise(runs, cells, args, base_info)
    total = time.time() - t_start
    table = format_table(rows, verdicts, total, len(runs))
    print("\n" + table)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")}
    setup.update(command="python " + " ".join(["benchmarks/continuum.py"] + (argv if argv is not None else sys.argv[1:])),
                 torch=torch.__version__, cpu_count=os.cpu_count(), total_seconds=round(total, 1),
                 date=time.strftime("%Y-%m-%d"))
    with open(args.out, "w") as f:
        json.dump(dict(setup=setup, summary=rows, verdicts=verdicts, runs=sorted(runs, key=lambda r: (
            r["base"], r["noise"], r["objective"], r["lr"], r["seed"])), table=table), f, indent=1)
    plot(rows, args.out[: -len(".json")] + ".png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
