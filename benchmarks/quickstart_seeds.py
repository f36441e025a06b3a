"""The quickstart recipe over seeds, with `auto` (the recipe), NLL and today's default on the same code: the README's
3-seed table. Each run is `trl-prob sft --config recipes/quickstart.yaml --seed S` with the objective flags of its
row, on one CPU thread (OMP_NUM_THREADS=1, so that runs in parallel do not share threads); the held-out exact match
comes from the run's own summary.json.
Runs go ``--jobs`` at a time. Resumable: a finished run is not run again.

    python benchmarks/quickstart_seeds.py                  # 3 seeds x 3 rows, about 10 minutes on 2 free cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {
    "auto": [],  # the recipe as it is
    "nll": ["--objective", "nll"],
    "default": ["--objective", "p", "--objective_schedule", "adaptive", "--schedule_signal", "token_top1"],
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "quickstart-seeds"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quickstart_seeds.json"))
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args(argv)
    results = json.load(open(args.out)) if os.path.exists(args.out) else {"runs": []}
    done = {(r["row"], r["seed"]) for r in results["runs"]}
    todo = [(row, seed) for row in args.rows for seed in args.seeds if (row, seed) not in done]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    running = []
    while todo or running:
        while todo and len(running) < args.jobs:
            row, seed = todo.pop(0)
            out = os.path.join(args.workdir, f"{row}-{seed}")
            cmd = ["trl-prob", "sft", "--config", "recipes/quickstart.yaml", "--seed", str(seed), "--output_dir", out,
                   "--overwrite_output_dir", "true", *ROWS[row]]  # fmt: skip
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((row, seed, out, time.time(), proc))
        row, seed, out, start, proc = running.pop(0)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"{row} seed {seed} failed:\n{stderr[-3000:]}")
        summary = json.load(open(os.path.join(out, "summary.json")))
        lam = summary.get("lambda") or {}
        results["runs"].append({
            "row": row, "seed": seed, "flags": ROWS[row], "wall_s": round(time.time() - start, 1),
            "exact_match_before": summary["before"]["exact_match"], "exact_match": summary["after"]["exact_match"],
            "lambda_first": (lam.get("first") or {}).get("value"), "lambda_last": (lam.get("last") or {}).get("value"),
            "threads": 1,
            "auto_line": next((line for line in stdout.splitlines() if "objective auto" in line), None),
        })  # fmt: skip
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"{row:8} seed {seed}: exact match {results['runs'][-1]['exact_match']:.3f}", flush=True)
    for row in args.rows:
        values = [r["exact_match"] for r in results["runs"] if r["row"] == row]
        print(f"{row:8} " + " / ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
