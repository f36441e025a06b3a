"""Whole optimizer steps on a real model: every objective and the adaptive blend against TRL's own `nll`, SmolLM2-135M-
Instruct on GSM8K chat rows, LoRA and full fine-tuning, with and without flushing subnormal floats, on CPU.

Each case is a fresh trainer on the same model directory and the same rows (TRL tokenises them), float32, trained for
`--steps` optimizer steps through `Trainer.train()`; `train_step.py`'s recorder takes, per step, the period between
consecutive `on_step_end` events (the first step of each run, which carries the set-up and the adaptive warm start,
is dropped) and the peak resident memory above what was live at `on_step_begin` (`VmHWM - VmRSS`, with the peak
counter reset at each step and `MALLOC_MMAP_THRESHOLD_=65536` so freed tensors leave the resident set). Cases run one
after another in one process; `trl:nll` is plain `trl.SFTTrainer` and the reference of every ratio. Subnormal
flushing is set for the whole process, TRL's baseline included, so every case of a run sees the same setting.

    python benchmarks/smollm2_cost.py --mode lora --flush on      # writes benchmarks/results/smollm2_cost_lora_flush.json
    python benchmarks/smollm2_cost.py --mode full --flush off --case trl:nll --case prob:p

A case ending in `@all_columns` computes every statistics column each micro-batch, as every run did before issue 35
(now a run computes the column groups its signal, schedule and extension read): the before / after of that change.

    python benchmarks/smollm2_cost.py --flush off --steps 7 --case trl:nll --case prob:p --case prob:p@all_columns \
        --case prob:p+adaptive --case prob:p+adaptive@all_columns --out benchmarks/results/smollm2_cost_columns.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

from train_step import REFERENCE, StepRecorder, parse_case  # noqa: E402  (also sets the offline environment)

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("trl:nll", "prob:nll", "prob:p", "prob:power:10", "prob:top_p:0.2", "prob:bottom_p:0.8",
         "prob:top_logp:0.2", "prob:bottom_logp:0.8", "prob:dft", "prob:p+adaptive")  # fmt: skip
ALL_COLUMNS_SUFFIX = "@all_columns"


def gsm8k_rows(n: int):
    """The first ``n`` shipped GSM8K training rows (prompt / completion) as a Dataset: the rows every step here sees."""
    from datasets import Dataset

    with open(os.path.join(ROOT, "examples", "data", "gsm8k", "train.jsonl")) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(n))]
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def lora_config():
    """The LoRA of the SmolLM2 step benchmarks (here and asft_memory.py): r 16 on every projection."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip


def step_args(output_dir: str, rows: int, steps: int, max_length: int, learning_rate: float = 1e-5,
              device: str = "cpu") -> dict:  # fmt: skip
    """The training arguments of the SmolLM2 step benchmarks (here and asft_memory.py): ``steps`` optimizer steps of
    ``rows`` rows, constant learning rate, nothing saved or reported, seeded; float32 on CPU, bf16 on a GPU."""
    on_gpu = device.startswith("cuda")
    return dict(output_dir=output_dir, per_device_train_batch_size=rows, max_steps=steps, learning_rate=learning_rate,
                lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=not on_gpu, bf16=on_gpu, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
                max_length=max_length, gradient_checkpointing=False)  # fmt: skip


def build_trainer(case: str, model_dir: str, data, args, output_dir: str):
    from trl import SFTConfig, SFTTrainer

    from trl_prob import ProbSFTTrainer
    from trl_prob.experimental import ExperimentalSFTConfig as ProbSFTConfig  # flush_denormal is a lab knob

    case, all_columns = case.removesuffix(ALL_COLUMNS_SUFFIX), case.endswith(ALL_COLUMNS_SUFFIX)
    info = parse_case(case)
    common = step_args(output_dir, args.rows, args.steps, args.max_length)
    peft_config = lora_config() if args.mode == "lora" else None
    if info["kind"] == "trl":
        trainer = SFTTrainer(model=model_dir, args=SFTConfig(**common), train_dataset=data, peft_config=peft_config)
    else:
        config = ProbSFTConfig(**common, objective=info["objective"], objective_schedule=info["schedule"],
                               schedule_warm_start_samples=8, flush_denormal=args.flush == "on")  # fmt: skip
        trainer = ProbSFTTrainer(model=model_dir, args=config, train_dataset=data, peft_config=peft_config)
        if all_columns:  # every column, as before issue 35: the hook's class with its column choice overridden
            from common import compute_stats_columns
            from trl_prob.stats import ALL_COLUMNS

            compute_stats_columns(trainer, ALL_COLUMNS)
    recorder = StepRecorder("cpu")
    trainer.add_callback(recorder)
    trainer.add_callback(CpuClock(recorder))
    return trainer, recorder


def CpuClock(recorder):
    """Process CPU seconds (all threads) between consecutive ``on_step_end`` events, into ``recorder.cpu_periods``:
    steadier than wall time on a shared machine."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        last = None

        def on_train_begin(self, *a, **k):
            self.last = None

        def on_step_end(self, *a, **k):
            now = time.process_time()
            if self.last is not None:
                recorder.cpu_periods.append(now - self.last)
            self.last = now

    recorder.cpu_periods = []
    return Clock()


def statistics_cost(rows: int, length: int, vocab: int, repeats: int = 200) -> dict:
    """Milliseconds of one micro-batch's statistics (``TokenProbStats.per_sample`` on every head output, shape
    ``rows x length``) with every column group and with the groups each kind of run now reads: the part of the step
    that issue 35's change touches, timed alone (median of ``repeats``)."""
    from trl_prob.stats import ALL_COLUMNS, TokenProbStats

    generator = torch.Generator().manual_seed(0)
    log_p = -torch.rand(rows, length, generator=generator) * 5
    head = dict(log_p=log_p, mask=torch.rand(rows, length, generator=generator) > 0.3, is_top1=log_p > -0.5,
                entropy=torch.rand(rows, length, generator=generator), log_sum_sq_probs=log_p / 2, vocab_size=vocab)  # fmt: skip
    out = {}
    for name, columns in (("all columns (before)", ALL_COLUMNS), ("top1 (adaptive, sequence_top1)", frozenset({"top1"})),
                          ("base only (fixed objective)", frozenset())):  # fmt: skip
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            TokenProbStats.per_sample(head["log_p"], head["mask"], torch.arange(rows)[:, None].expand(rows, length),
                                      rows, None, head["is_top1"], head["entropy"], head["log_sum_sq_probs"], vocab,
                                      columns=columns)  # fmt: skip
            times.append(time.perf_counter() - start)
        out[name] = 1000 * statistics.median(times)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--flush", choices=["on", "off"], default="on", help="torch.set_flush_denormal for the run")
    parser.add_argument("--case", action="append", help=f"cases (default: all of {', '.join(CASES)})")
    parser.add_argument("--rows", type=int, default=2, help="rows per optimizer step")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per case (the first is not timed)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)], env)
    warnings.filterwarnings("ignore")
    import logging

    import transformers
    import trl

    from trl_prob.models import smollm2_dir

    transformers.logging.set_verbosity_error()
    logging.getLogger("trl_prob").setLevel(logging.ERROR)
    torch.set_flush_denormal(args.flush == "on")

    cases = args.case or list(CASES)
    if REFERENCE not in cases:
        cases.insert(0, REFERENCE)
    model_dir = smollm2_dir()
    data = gsm8k_rows(args.rows * args.steps)
    workdir = tempfile.mkdtemp(prefix="trl-prob-smollm2-cost-")

    summary = {}
    for case in cases:
        trainer, recorder = build_trainer(case, model_dir, data, args, os.path.join(workdir, case.replace(":", "_")))
        start = time.perf_counter()
        trainer.train()
        summary[case] = {
            "step_s": recorder.periods,
            "peak_mib": recorder.peaks[1:],
            "train_call_s": time.perf_counter() - start,
            "step_s_median": statistics.median(recorder.periods),
            "step_cpu_s": recorder.cpu_periods,
            "step_cpu_s_median": statistics.median(recorder.cpu_periods),
            "peak_mib_median": statistics.median(recorder.peaks[1:]),
        }
        print(f"{case:24s} step {summary[case]['step_s_median']:.2f} s   peak +{summary[case]['peak_mib_median']:.0f} MiB",
              flush=True)  # fmt: skip
        del trainer
    reference = summary[REFERENCE]
    for case in cases:
        summary[case]["time_ratio"] = summary[case]["step_s_median"] / reference["step_s_median"]
        summary[case]["cpu_time_ratio"] = summary[case]["step_cpu_s_median"] / reference["step_cpu_s_median"]
        summary[case]["memory_ratio"] = summary[case]["peak_mib_median"] / reference["peak_mib_median"]

    print(f"\n{'case':24s} {'step s':>8s} {'x trl:nll':>9s} {'CPU s':>8s} {'x trl:nll':>9s} {'peak MiB':>9s} {'x trl:nll':>9s}")
    for case in cases:
        s = summary[case]
        print(f"{case:24s} {s['step_s_median']:8.2f} {s['time_ratio']:9.2f} {s['step_cpu_s_median']:8.2f} "
              f"{s['cpu_time_ratio']:9.2f} {s['peak_mib_median']:9.0f} {s['memory_ratio']:9.2f}")
    micro = {f"{rows}x{length}": statistics_cost(rows, length, 49152)  # this run's batches, and a GPU-sized one
             for rows, length in ((args.rows, args.max_length), (8, 2048))}  # fmt: skip
    for shape, ms in micro.items():
        print(f"statistics of one {shape} micro-batch alone (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    record = {
        "statistics_ms_per_micro_batch": micro,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/smollm2_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "threads": torch.get_num_threads(),
        "model": "SmolLM2-135M-Instruct (trl_prob.models), float32",
        "mode": args.mode, "flush_denormal": args.flush == "on", "rows_per_step": args.rows,
        "max_length": args.max_length, "timed_steps_per_case": args.steps - 1,
        "cases": summary,
    }  # fmt: skip
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"smollm2_cost_{args.mode}_{'flush' if args.flush == 'on' else 'noflush'}.json")  # fmt: skip
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
