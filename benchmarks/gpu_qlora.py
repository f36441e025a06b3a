"""QLoRA on a Qwen2.5-7B-shaped model under a 24 GB cap: tokens/s and peak memory, ProbSFTTrainer vs TRL SFTTrainer.

The model is a randomly initialised ``Qwen2ForCausalLM`` with the real Qwen2.5-7B shape (28 layers, hidden 3584,
MLP 18944, 28 heads / 4 KV heads, vocab 152064, untied head). No hub access is needed: it is built directly on
the GPU in bf16, saved once to local disk (``--workdir``, default ``/tmp/trl-prob-qwen7b``), and every case
loads it back the way a user loads a QLoRA base model::

    AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
        bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True),
        dtype=torch.bfloat16, device_map={"": 0})

then trains with LoRA r=16 (alpha 32, dropout 0.05) on all linear layers (``target_modules="all-linear"``, the LM
head excluded), gradient checkpointing, bf16, batch ``--batch-size`` of ``--seq-len`` tokens (pre-tokenised random
ids, completion = last 3/4), ``adamw_torch``, through the real ``train()`` loop. Before loading, the process is
capped with ``torch.cuda.set_per_process_memory_fraction(cap / total)``: the caching allocator cannot reserve more
than ``--cap-gib`` (an out-of-memory error there means the run does not fit the cap).

Cases: ``trl:nll`` (``trl.SFTTrainer``) and ``prob:power:10+adaptive`` (``trl_prob.ProbSFTTrainer``, objective
``power:10``, ``objective_schedule="adaptive"``, warm start on 8 samples); ``--case`` adds others
(``prob:<spec>``, ``prob:<spec>+adaptive``).

Reported per (seq_len, case): tokens/s (batch x seq_len / median step period, the first step dropped), peak
``max_memory_allocated`` and ``max_memory_reserved`` during ``train()``, memory held by the loaded model, and
OOM if it did not fit.

Usage (on the GPU; one call of about 6-8 minutes)::

    python benchmarks/gpu_qlora.py --seq-len 4096 --seq-len 3072 --steps 5

CPU smoke test of the script itself (tiny Qwen2 shape, no cap)::

    python benchmarks/gpu_qlora.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_CASES = ("trl:nll", "prob:power:10+adaptive")

# Qwen/Qwen2.5-7B config.json (shape only)
QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=151643,
    eos_token_id=151643,
)
SMOKE = dict(QWEN25_7B, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_and_save(shape: dict, path: str, device: str) -> float:
    """Random-init the model in bf16 directly on ``device`` and save it as safetensors. Returns seconds."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        log(f"reusing the saved model in {path}")
        return 0.0
    start = time.perf_counter()
    config = Qwen2Config(**shape)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = torch.bfloat16
    n = sum(p.numel() for p in model.parameters())
    log(f"built {n / 1e9:.2f}B params in {time.perf_counter() - start:.1f} s; saving to {path}")
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    elapsed = time.perf_counter() - start
    log(f"saved in {elapsed:.1f} s total")
    return elapsed


def load_quantized(path: str, device: str, quantize: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(dtype=torch.bfloat16)
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    if device.startswith("cuda"):
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def build_dataset(vocab: int, seq_len: int, n: int, seed: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    prompt = seq_len // 4
    rows = [
        {"input_ids": torch.randint(3, vocab, (seq_len,), generator=g).tolist(), "completion_mask": [0] * prompt + [1] * (seq_len - prompt)}
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def parse_case(case: str) -> dict:
    kind, _, rest = case.partition(":")
    if kind == "trl" and rest == "nll":
        return {"kind": "trl"}
    if kind != "prob" or not rest:
        raise ValueError(f"Unknown case {case!r}: trl:nll or prob:<spec>[+adaptive]")
    if rest.endswith("+adaptive"):
        return {"kind": "prob", "objective": rest[: -len("+adaptive")], "schedule": "adaptive"}
    return {"kind": "prob", "objective": rest, "schedule": "none"}


def make_recorder(device: str):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.ends = []
            self.train_begin = None
            self.first_step_begin = None

        def _now(self):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = self._now()

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_step_begin is None:
                self.first_step_begin = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(self._now())

    return Recorder()


def run_case(case: str, seq_len: int, args, model_path: str, tokenizer, workdir: str) -> dict:
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from trl_prob import ProbSFTConfig, ProbSFTTrainer

    on_gpu = args.device.startswith("cuda")
    info = parse_case(case)
    result = {"case": case, "seq_len": seq_len, "batch_size": args.batch_size}
    model = trainer = None
    try:
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = load_quantized(model_path, args.device, quantize=not args.no_quantize)
        result["load_s"] = time.perf_counter() - start
        if on_gpu:
            result["model_mib"] = torch.cuda.memory_allocated() / 2**20
        dataset = build_dataset(model.config.vocab_size, seq_len, args.batch_size * (args.steps + 1) + 8, args.seed)
        common = dict(
            output_dir=os.path.join(workdir, f"{case.replace(':', '_')}-{seq_len}"),
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=on_gpu,
            use_cpu=not on_gpu,
            gradient_checkpointing=True,
            max_length=seq_len,
            completion_only_loss=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=args.seed,
        )
        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        if info["kind"] == "trl":
            trainer = SFTTrainer(
                model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
            )
        else:
            config = ProbSFTConfig(
                **common,
                objective=info["objective"],
                objective_schedule=info["schedule"],
                schedule_warm_start_samples=8,
                per_device_eval_batch_size=args.batch_size,
            )
            trainer = ProbSFTTrainer(
                model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
            )
        recorder = make_recorder(args.device)
        trainer.add_callback(recorder)
        result["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
        result["train_s"] = time.perf_counter() - start
        periods = [b - a for a, b in zip(recorder.ends, recorder.ends[1:])]
        result["step_s"] = periods
        result["first_step_s"] = recorder.ends[0] - recorder.first_step_begin
        result["train_begin_s"] = recorder.first_step_begin - recorder.train_begin  # set-up + warm-start probe
        step = statistics.median(periods) if periods else result["first_step_s"]
        result["step_s_median"] = step
        result["tokens_per_s"] = args.batch_size * seq_len / step
        if on_gpu:
            result["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            result["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result["losses"] = losses
        lam = [h.get("objective_lambda") for h in trainer.state.log_history if "objective_lambda" in h]
        if lam:
            result["objective_lambda"] = lam
        result["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        result["status"] = "OOM"
        result["error"] = str(e).splitlines()[0][:400]
        if on_gpu:
            result["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            result["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    finally:
        del trainer, model
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, action="append", help="sequence lengths (default: 4096 and 3072)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per case (first one dropped)")
    parser.add_argument("--case", action="append", help=f"cases (default: {', '.join(DEFAULT_CASES)})")
    parser.add_argument("--cap-gib", type=float, default=24.0, help="per-process GPU memory cap in GiB (0: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default="/tmp/trl-prob-qwen7b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny Qwen2 shape, for checking the script on CPU")
    parser.add_argument("--no-quantize", action="store_true", help="skip bitsandbytes (smoke tests without bnb)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_qlora.json)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    on_gpu = args.device.startswith("cuda")
    shape = SMOKE if args.smoke else QWEN25_7B
    seq_lens = args.seq_len or ([64, 48] if args.smoke else [4096, 3072])
    cases = args.case or list(DEFAULT_CASES)
    for case in cases:
        parse_case(case)
    workdir = args.workdir + ("-smoke" if args.smoke else "")
    model_path = os.path.join(workdir, "model")

    meta = {
        "benchmark": "gpu_qlora",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu (smoke test)",
        "torch": torch.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "model": ("tiny Qwen2 (smoke)" if args.smoke else "Qwen2.5-7B shape, random init") + f": {shape}",
        "quantization": None if args.no_quantize else "bitsandbytes nf4, double quant, bf16 compute",
        "lora": "r=16, alpha=32, dropout=0.05, target_modules=all-linear (lm_head excluded)",
        "gradient_checkpointing": True,
        "precision": "bf16" if on_gpu else "fp32 (CPU)",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "cap_gib": args.cap_gib if on_gpu else None,
    }
    try:
        import bitsandbytes
        import peft

        meta["bitsandbytes"], meta["peft"] = bitsandbytes.__version__, peft.__version__
    except ImportError:
        pass
    if on_gpu:
        total = torch.cuda.get_device_properties(0).total_memory
        meta["gpu_total_gib"] = total / 2**30
    log(json.dumps(meta))

    meta["build_s"] = build_and_save(shape, model_path, args.device)
    if on_gpu and args.cap_gib:
        fraction = min(1.0, args.cap_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        meta["memory_fraction"] = fraction
        log(f"capped at {args.cap_gib} GiB = {fraction:.4f} of {total / 2**30:.1f} GiB")

    from addition import build_tokenizer

    tokenizer = build_tokenizer()  # pad/eos ids only: the data is pre-tokenised
    results = {"meta": meta, "runs": []}
    out = args.out or os.path.join(RESULTS, "gpu_qlora_smoke.json" if args.smoke else "gpu_qlora.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="trl-prob-qlora-")
    for seq_len in seq_lens:
        for case in cases:
            log(f"seq_len {seq_len} batch {args.batch_size}: {case}")
            r = run_case(case, seq_len, args, model_path, tokenizer, run_dir)
            results["runs"].append(r)
            log(
                f"  {r['status']}: "
                + (f"{r.get('tokens_per_s', 0):.0f} tok/s, " if r["status"] == "ok" else "")
                + f"peak allocated {r.get('peak_allocated_mib', float('nan')) / 1024:.2f} GiB, "
                f"reserved {r.get('peak_reserved_mib', float('nan')) / 1024:.2f} GiB"
            )
            with open(out, "w") as f:  # after every case: a call cut short still leaves its numbers
                json.dump(results, f, indent=2)

    # ratios vs trl:nll at the same seq_len
    for seq_len in seq_lens:
        ref = next((r for r in results["runs"] if r["seq_len"] == seq_len and r["case"] == "trl:nll" and r["status"] == "ok"), None)
        for r in results["runs"]:
            if r["seq_len"] == seq_len and ref and r["status"] == "ok":
                r["tokens_per_s_ratio_vs_trl_nll"] = r["tokens_per_s"] / ref["tokens_per_s"]
                if "peak_allocated_mib" in r:
                    r["peak_allocated_ratio_vs_trl_nll"] = r["peak_allocated_mib"] / ref["peak_allocated_mib"]
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{'seq':>5s} {'case':26s} {'status':6s} {'tok/s':>8s} {'x tok/s':>8s} {'peak alloc GiB':>14s} {'x mem':>6s} {'reserved GiB':>12s}")
    for r in results["runs"]:
        print(
            f"{r['seq_len']:5d} {r['case']:26s} {r['status']:6s} {r.get('tokens_per_s', float('nan')):8.0f} "
            f"{r.get('tokens_per_s_ratio_vs_trl_nll', float('nan')):8.3f} {r.get('peak_allocated_mib', float('nan')) / 1024:14.2f} "
            f"{r.get('peak_allocated_ratio_vs_trl_nll', float('nan')):6.3f} {r.get('peak_reserved_mib', float('nan')) / 1024:12.2f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
