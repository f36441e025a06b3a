"""Where a CPU user waits, on a real model (SmolLM2-135M-Instruct, GSM8K chat rows): the probe, the warm start and a
LoRA step, in float32 and under bf16 autocast, on this CPU as it is and held below native bf16.

The issue this answers (a user's `trl-prob sft --use_peft ... --objective_schedule adaptive --use_cpu` on a CPU without
AVX512-BF16/AMX): the warm start took 5x the standalone probe on the same rows, and a step 10x `--bf16 false`. Its
cause: TRL's `SFTConfig` turns bf16 on by default, so training (and the warm start inside `train()`, under accelerate's
autocast) ran in emulated bf16, while `trl-prob probe` measured in float32. trl-prob now picks float32 on such a CPU
unless `--bf16` is given. Measured here, in one process per CPU setting, on the same TRL-prepared batches:

- `plain forward`: the model's ordinary forward with full logits over the rows (float32, `torch.no_grad`, batched);
- `probe`: `ProbSFTTrainer.measure_token_probs` as `trl-prob probe` runs it (float32, fused log-prob head);
- `warm start`: the same measurement where training runs it, inside `train()` before step 1, under the run's precision:
  `bf16=True` (TRL's default, what the user got before) and the precision trl-prob now chooses (`bf16` unset);
- `LoRA step`: one optimizer step of 2 rows, same two precisions.

"Held below native bf16" runs the same script with `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`: oneDNN and ATen
then use AVX2 kernels only, as on the issue's CPU, and bf16 is emulated. Each time is given as wall seconds and process
CPU seconds (all threads); CPU seconds are the steadier figure on a shared machine. The plain forward and the probe
run twice, interleaved, and the faster run of each is kept.

    python benchmarks/smollm2_cpu.py                 # both CPU settings; writes benchmarks/results/smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD_BELOW_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


class Clock:
    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 2), "cpu_s": round(time.process_time() - self.cpu, 2)}


def measure_setting(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_prob import ProbSFTConfig, ProbSFTTrainer
    from trl_prob.config import cpu_has_native_bf16
    from trl_prob.models import smollm2_dir

    model_dir = smollm2_dir()
    with open(os.path.join(ROOT, "examples", "data", "gsm8k", "train.jsonl")) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.rows))]
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])

    def config(**overrides):
        return ProbSFTConfig(output_dir=os.path.join(args.workdir, "run"), use_cpu=True, max_length=args.max_length,
                             per_device_train_batch_size=2, per_device_eval_batch_size=args.batch_size, max_steps=1,
                             objective="p", objective_schedule="adaptive", schedule_warm_start_samples=args.rows,
                             report_to="none", disable_tqdm=True, save_strategy="no", gradient_checkpointing=False,
                             logging_steps=1, learning_rate=1e-4, **overrides)  # fmt: skip

    def lora():
        return LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")

    result = {"native_bf16_detected": cpu_has_native_bf16(), "threads": torch.get_num_threads()}

    # The probe and a plain full-logits forward over the same batches, float32.
    trainer = ProbSFTTrainer(model=model_dir, args=config(bf16=False), train_dataset=data, peft_config=lora())
    batches = [trainer._prepare_inputs(b) for b in trainer.get_eval_dataloader(trainer.train_dataset)]
    result["tokens"] = int(sum(int((b["labels"] != -100).sum()) for b in batches))
    def plain():
        with torch.no_grad():
            for b in batches:
                trainer.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits.float()

    for name, run in (("plain_forward", plain), ("probe", lambda: trainer.measure_token_probs(progress=False))) * 2:
        clock = Clock()
        run()
        reading = clock.read()  # the faster of two interleaved runs of each
        result[name] = min(result.get(name, reading), reading, key=lambda r: r["cpu_s"])
    del trainer

    # The warm start inside train(), and one LoRA step, under each precision.
    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.clock = Clock()

        def on_step_end(self, *a, **k):
            self.step = self.clock.read()

    for name, overrides in (("bf16_true", {"bf16": True}), ("chosen", {})):
        args_ = config(**overrides)
        trainer = ProbSFTTrainer(model=model_dir, args=args_, train_dataset=data, peft_config=lora())
        measured = {}
        original = trainer.measure_token_probs

        def timed(*a, _original=original, _measured=measured, **k):
            clock = Clock()
            out = _original(*a, **k)
            _measured.update(clock.read())
            return out

        trainer.measure_token_probs = timed
        step = StepClock()
        trainer.add_callback(step)
        trainer.train()
        result[f"warm_start_{name}"] = {**measured, "bf16": bool(args_.bf16)}
        result[f"lora_step_{name}"] = {**step.step, "bf16": bool(args_.bf16)}
        del trainer
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8, help="per_device_eval_batch_size (TRL's default: 8)")
    parser.add_argument("--setting", choices=["native", "held_below_bf16"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "smollm2_cpu.json"))
    args = parser.parse_args(argv)
    args.workdir = os.path.join("/tmp", f"trl-prob-smollm2-cpu-{os.getpid()}")
    if args.setting:  # one CPU setting, in this process: print its JSON
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        print("RESULT " + json.dumps(measure_setting(args)), flush=True)
        return

    results = {}
    for setting, env in (("native", {}), ("held_below_bf16", HELD_BELOW_BF16)):
        command = [sys.executable, os.path.abspath(__file__), "--setting", setting, "--rows", str(args.rows),
                   "--max_length", str(args.max_length), "--batch_size", str(args.batch_size)]  # fmt: skip
        out = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
        results[setting] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        results[setting]["env"] = env
        print(setting, json.dumps(results[setting], indent=1), flush=True)

    import torch
    import transformers
    import trl

    record = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/smollm2_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "rows": args.rows, "max_length": args.max_length, "eval_batch_size": args.batch_size,
        "results": results,
    }  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
