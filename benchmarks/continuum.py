"""The capability continuum of "Beyond Log Likelihood" in miniature, trained through ``ProbSFTTrainer`` itself.

Task: 2-digit addition, exact match on a clean held-out test set. SFT data carries label noise (default 40%).
Base models at three places on the continuum are made by pretraining ``random_tiny_llama`` on CLEAN addition until
a measured validation accuracy (strong ~0.7, partial ~0.3; none = random init); they are cached on disk.
Each base is then SFT'd with ``nll``, ``p``, ``power:10``, ``top_p:0.2`` and ``adaptive`` (objective ``p``,
``objective_schedule="adaptive"``, its defaults) with the same budget, a small learning-rate sweep chosen per
(base, objective, noise) on a validation split, and several seeds. Reports held-out accuracy mean +- standard error
per (base, objective) beside each base's probe value (mean target-token p on the SFT data).

    python benchmarks/continuum.py            # full grid (<20 min on 2 CPU cores, target)
    python benchmarks/continuum.py --quick    # smaller grid
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

from datasets import Dataset
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from trl_prob import ProbSFTConfig, ProbSFTTrainer
from trl_prob.embedded import (
    build_tokenizer,
    exact_match_accuracy,
    make_addition_examples,
    mean_target_probability,
    pretrain_on_task,
    random_tiny_llama,
)

OBJECTIVES = ["nll", "p", "power:10", "top_p:0.2", "adaptive"]
HERE = os.path.dirname(os.path.abspath(__file__))


def _prompts(rows):
    return [r["prompt"] for r in rows]


def make_splits(args):
    test = make_addition_examples(args.n_test, noise=0.0, seed=1001)
    val = make_addition_examples(args.n_val, noise=0.0, seed=1002, exclude=_prompts(test))
    held = set(_prompts(test)) | set(_prompts(val))
    pretrain = make_addition_examples(4000, noise=0.0, seed=1003, exclude=held)
    return test, val, pretrain, held


def build_bases(tok, val, pretrain, args):
    """{name: model}; pretrains once (clean data), snapshots at the partial target, stops at the strong target."""
    cache = os.path.join(args.cache_dir, f"seed{args.base_seed}_p{args.partial}_s{args.strong}")
    names = ["none", "partial", "strong"]
    if all(os.path.isdir(os.path.join(cache, n)) for n in names):
        return {n: LlamaForCausalLM.from_pretrained(os.path.join(cache, n)).eval() for n in names}
    model = random_tiny_llama(seed=args.base_seed)
    os.makedirs(cache, exist_ok=True)
    model.save_pretrained(os.path.join(cache, "none"))
    check = val[: min(len(val), 300)]
    saved = {"partial": False}

    def until(m):
        acc = exact_match_accuracy(m, tok, check)
        print(f"  pretrain check: val acc {acc:.3f}", flush=True)
        if acc >= args.partial and not saved["partial"]:
            m.save_pretrained(os.path.join(cache, "partial"))
            saved["partial"] = True
        return acc >= args.strong

    t0 = time.time()
    pretrain_on_task(model, tok, pretrain, steps=args.pretrain_steps, lr=3e-3, batch_size=128, seed=args.base_seed,
                     until=until, check_every=50)
    print(f"  pretraining took {time.time() - t0:.0f}s", flush=True)
    if not saved["partial"]:
        raise RuntimeError("pretraining never reached the partial target; raise --pretrain-steps")
    model.save_pretrained(os.path.join(cache, "strong"))
    return {n: LlamaForCausalLM.from_pretrained(os.path.join(cache, n)).eval() for n in names}


def sft(base_dir, tok, train_ds, objective, lr, seed, args, out_dir):
    model = LlamaForCausalLM.from_pretrained(base_dir)
    kwargs = dict(objective="p", objective_schedule="adaptive") if objective == "adaptive" else dict(objective=objective)
    config = ProbSFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=5,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kwargs,
    )
    trainer = ProbSFTTrainer(model=model, args=config, train_dataset=train_ds, processing_class=tok)
    trainer.train()
    model = trainer.model.eval()
    return model


def mean_se(xs):
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller grid: 1000 SFT examples, lrs 1e-3 3e-3, 2 seeds")
    ap.add_argument("--noise", type=float, nargs="+", default=None,
                    help="SFT label-noise levels; the first is used for every base, the rest on the strong base only "
                         "(default 0.4; e.g. --noise 0.4 0 0.2)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--lrs", type=float, nargs="+", default=None)
    ap.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    ap.add_argument("--bases", nargs="+", default=["none", "partial", "strong"])
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--partial", type=float, default=0.3)
    ap.add_argument("--strong", type=float, default=0.7)
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=8000)
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "trl_prob_continuum"))
    ap.add_argument("--out", default=None, help="JSON path (PNG beside it)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is ~9x faster than 2 for this tiny model on a busy 2-core box)")
    args = ap.parse_args(argv)
    args.noise = args.noise or [0.4]
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    args.lrs = args.lrs or ([1e-3, 3e-3] if args.quick else [3e-4, 1e-3, 3e-3])
    args.n_train = args.n_train or (1000 if args.quick else 2000)
    args.out = args.out or os.path.join(HERE, "results", "continuum_quick.json" if args.quick else "continuum.json")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    t_start = time.time()
    tok = build_tokenizer()
    test, val, pretrain, held = make_splits(args)
    bases = build_bases(tok, val, pretrain, args)
    cache = os.path.join(args.cache_dir, f"seed{args.base_seed}_p{args.partial}_s{args.strong}")

    # (base, noise) cells: the first noise level on every base, the others on the strong base.
    cells = [(b, args.noise[0]) for b in args.bases] + [("strong", nz) for nz in args.noise[1:]]
    sft_data, base_info = {}, {}
    for b, nz in cells:
        rows = make_addition_examples(args.n_train, noise=nz, seed=2000 + int(round(nz * 100)), exclude=held)
        sft_data[nz] = rows
        base_info[(b, nz)] = dict(
            probe_mean_p=mean_target_probability(bases[b], tok, rows),
            base_val_acc=exact_match_accuracy(bases[b], tok, val),
            base_test_acc=exact_match_accuracy(bases[b], tok, test),
        )
        print(f"base {b:8s} noise {nz:.1f}: probe mean p {base_info[(b, nz)]['probe_mean_p']:.3f}, "
              f"test acc {base_info[(b, nz)]['base_test_acc']:.3f}", flush=True)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for b, nz in cells:
            ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in sft_data[nz]])
            for obj in args.objectives:
                for lr in args.lrs:
                    for seed in args.seeds:
                        t0 = time.time()
                        m = sft(os.path.join(cache, b), tok, ds, obj, lr, seed, args, os.path.join(tmp, "run"))
                        r = dict(base=b, noise=nz, objective=obj, lr=lr, seed=seed,
                                 val_acc=exact_match_accuracy(m, tok, val), test_acc=exact_match_accuracy(m, tok, test),
                                 seconds=time.time() - t0)
                        runs.append(r)
                        print(f"  {b:8s} nz={nz:.1f} {obj:10s} lr={lr:.0e} seed={seed}: val {r['val_acc']:.3f} "
                              f"test {r['test_acc']:.3f} ({r['seconds']:.1f}s)", flush=True)

    # Pick the lr per (base, noise, objective) on mean validation accuracy; report test mean +- s.e. over seeds.
    rows = []
    for b, nz in cells:
        for obj in args.objectives:
            by_lr = {lr: [r for r in runs if (r["base"], r["noise"], r["objective"], r["lr"]) == (b, nz, obj, lr)]
                     for lr in args.lrs}
            best_lr = max(args.lrs, key=lambda lr: statistics.fmean(r["val_acc"] for r in by_lr[lr]))
            m, se = mean_se([r["test_acc"] for r in by_lr[best_lr]])
            rows.append(dict(base=b, noise=nz, objective=obj, lr=best_lr, test_acc_mean=m, test_acc_se=se,
                             **base_info[(b, nz)]))

    # Verdicts per cell: is adaptive within one s.e. of the best fixed objective, and ahead of the worst?
    verdicts = []
    for b, nz in cells:
        cell = [r for r in rows if (r["base"], r["noise"]) == (b, nz)]
        fixed = [r for r in cell if r["objective"] != "adaptive"]
        ada = [r for r in cell if r["objective"] == "adaptive"]
        if not fixed or not ada:
            continue
        ada = ada[0]
        best = max(fixed, key=lambda r: r["test_acc_mean"])
        worst = min(fixed, key=lambda r: r["test_acc_mean"])
        se = math.hypot(ada["test_acc_se"], best["test_acc_se"])
        verdicts.append(dict(base=b, noise=nz, best_fixed=best["objective"], best_fixed_acc=best["test_acc_mean"],
                             worst_fixed=worst["objective"], worst_fixed_acc=worst["test_acc_mean"],
                             adaptive_acc=ada["test_acc_mean"],
                             adaptive_within_1se_of_best=bool(best["test_acc_mean"] - ada["test_acc_mean"] <= se),
                             adaptive_ahead_of_worst=bool(ada["test_acc_mean"] > worst["test_acc_mean"])))

    lines = [f"{'base':8s} {'noise':>5s} {'probe p':>7s} {'base acc':>8s}  {'objective':10s} {'lr':>6s} "
             f"{'test acc':>8s} {'s.e.':>6s}"]
    for r in rows:
        lines.append(f"{r['base']:8s} {r['noise']:5.1f} {r['probe_mean_p']:7.3f} {r['base_test_acc']:8.3f}  "
                     f"{r['objective']:10s} {r['lr']:6.0e} {r['test_acc_mean']:8.3f} {r['test_acc_se']:6.3f}")
    lines.append("")
    for v in verdicts:
        lines.append(f"{v['base']:8s} nz={v['noise']:.1f}: adaptive {v['adaptive_acc']:.3f}; best fixed "
                     f"{v['best_fixed']} {v['best_fixed_acc']:.3f} (within 1 s.e.: {v['adaptive_within_1se_of_best']}); "
                     f"worst fixed {v['worst_fixed']} {v['worst_fixed_acc']:.3f} (ahead: {v['adaptive_ahead_of_worst']})")
    total = time.time() - t_start
    lines.append(f"total {total:.0f}s, {len(runs)} SFT runs")
    table = "\n".join(lines)
    print("\n" + table)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")}
    setup.update(command="python " + " ".join(["benchmarks/continuum.py"] + (argv if argv is not None else sys.argv[1:])),
                 torch=torch.__version__, threads=torch.get_num_threads(), total_seconds=total)
    with open(args.out, "w") as f:
        json.dump(dict(setup=setup, summary=rows, verdicts=verdicts, runs=runs, table=table), f, indent=1)
    plot(rows, args.out[: -len(".json")] + ".png")
    print(f"wrote {args.out}")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    noise0 = rows[0]["noise"]
    for obj in dict.fromkeys(r["objective"] for r in rows):
        pts = sorted((r["probe_mean_p"], r["test_acc_mean"], r["test_acc_se"]) for r in rows
                     if r["objective"] == obj and r["noise"] == noise0)
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=[0 if math.isnan(e) else e for e in es], marker="o", capsize=3, label=obj,
                    lw=2.5 if obj == "adaptive" else 1.2)
    ax.set_xlabel(f"base probe: mean target-token p on the SFT data (noise {noise0:.0%})")
    ax.set_ylabel("held-out exact match after SFT")
    ax.set_title("Capability continuum in miniature (ProbSFTTrainer)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
