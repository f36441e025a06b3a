"""ASFT: memory and time of trl-prob's fused form against the full-logits form with a reference copy, and of a real
LoRA step with ``asft`` against ``nll``.

ASFT (arXiv 2509.23753) trains, per target token, -sg(p) log p + alpha KL(q_ref || p_model), the KL over the vocabulary.

Part 1, the head and the loss at Qwen2.5's vocabulary (V = 152064), one forward + backward, side by side in one process
on the same weight, hidden states and labels (the head frozen, as under LoRA):

- ``fused:nll``: TRL's fused head alone (``add_fused_lm_head``, SFTTrainer's outputs), TRL's NLL: the floor.
- ``fused:asft``: trl-prob's path. The same head gives log p; the KL is :func:`trl_prob.asft.chunked_kl` (TRL's
  ``ChunkedDivergenceFunction``, beta 0) on the model's and the reference's hidden states through the one frozen head
  (LoRA: the reference is the base, the same weights); the per-token loss is ``get_objective("asft:0.1")``.
- ``full:asft``: the authors' / LLaMA-Factory's approach: a second copy of the reference (here its LM head), full
  ``[N, V]`` logits of both, ``.float()``, shifted ``.contiguous()`` copies, ``log_softmax`` / cross-entropy,
  ``F.kl_div(log_softmax(policy), softmax(ref))`` summed over the vocabulary, mean over target tokens.

The "model" is the LM head: a leaf hidden state ``[1, N + 1, H]`` (requires grad: the LoRA backbone below it trains)
and the reference's hidden state (no grad; the fused form gets it from one no-grad backbone pass with the adapters
disabled). Peak memory is what the step adds above what is live before it (CPU: ``VmHWM - VmRSS`` with the peak
counter reset and ``MALLOC_MMAP_THRESHOLD_=65536``, as ``loss_memory.py`` measures; CUDA: ``max_memory_allocated``);
the full form's resident reference copy is reported beside it (here the head, ``V x H``; for a real model the whole
model: ~1 GB in bf16 for Qwen2.5-0.5B, 15 GB for 7B). Time: the median of ``--repeats`` rounds, cases interleaved.

Part 2, whole optimizer steps of SmolLM2-135M-Instruct with LoRA (``ProbSFTTrainer``, GSM8K chat rows, float32):
``nll`` against ``asft`` (whose step adds one no-grad backbone pass with the adapters disabled and the chunked KL), the
first step of each run not timed; ``train_step.py``'s recorder (period between ``on_step_end`` events, peak above
``on_step_begin``).

The load average (``os.getloadavg``, what ``uptime`` prints) is recorded beside every timing: on a shared CPU, times
are only comparable at a similar load.

Usage (CPU, the committed results, ~8 min on a loaded 2-core machine)::

    python benchmarks/asft_memory.py

GPU (one prepared command: Qwen2.5-7B's head, N = 8192 tokens, bf16; SmolLM2 on the GPU)::

    python benchmarks/asft_memory.py --device cuda --dtype bfloat16 --hidden 3584 --tokens 2048 --tokens 8192 \\
        --repeats 5 --steps 8 --rows 8 --max_length 512 --out benchmarks/results/asft_memory_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
VOCAB = 152064  # Qwen2.5
ALPHA = 0.1
CASES = ("fused:nll", "fused:asft", "full:asft")


def load() -> float:
    """The 1-minute load average, as ``uptime`` prints it."""
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------------------------- part 1: head + loss


def make_inputs(vocab, hidden, tokens, dtype, device, seed=0):
    """Head ~ N(0, 0.02^2); hidden states with the next label's head row planted (p(target) spread over (0, 1), as a
    trained model's); the reference's hidden states a perturbation of them (a LoRA model near its base); 25% of the
    labels -100 (prompt tokens)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g) * 0.02
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=g)
    margin = math.log(vocab) + torch.empty(tokens + 1).uniform_(-3.0, 5.0, generator=g)
    next_labels = torch.cat([labels[0, 1:], labels[0, :1]])
    rows = weight[next_labels]
    h = torch.randn(tokens + 1, hidden, generator=g) * 0.5 + (margin / rows.pow(2).sum(-1)).unsqueeze(-1) * rows
    h_ref = h + torch.randn(tokens + 1, hidden, generator=g) * 0.3
    labels = labels.masked_fill(torch.rand(1, tokens + 1, generator=g) < 0.25, -100)
    to = dict(device=device, dtype=dtype)
    return weight.to(**to), h.to(**to).unsqueeze(0), h_ref.to(**to).unsqueeze(0), labels.to(device)


def build_cases(weight, device):
    """The three steps, each a function of (hidden leaf, reference hidden, labels) that runs forward + backward."""
    import torch.nn.functional as F
    from trl.trainer.utils import add_fused_lm_head

    from trl_prob.asft import chunked_kl
    from trl_prob.head import HeadTokens
    from trl_prob.objectives import get_objective

    from loss_memory import HeadOnlyLM

    vocab, hidden = weight.shape
    model = HeadOnlyLM(vocab, hidden, weight.dtype, weight.device, frozen_head=True)  # LoRA: the head is frozen
    with torch.no_grad():
        model.lm_head.weight.copy_(weight)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # SFTTrainer's request
    asft = get_objective(f"asft:{ALPHA}")
    reference_copy = {}

    def fused_nll(hidden, ref_hidden, labels):
        out = model(inputs_embeds=hidden, labels=labels, fused_lm_head=True)
        loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
        loss.backward()
        return loss

    def fused_asft(hidden, ref_hidden, labels):
        out = model(inputs_embeds=hidden, labels=labels, fused_lm_head=True)
        mask = out.label_mask
        head = model.lm_head
        kl = chunked_kl(hidden[:, :-1][mask], head.weight, None, ref_hidden[:, :-1][mask], head.weight, None)
        ref_kl = kl.new_zeros(mask.shape).masked_scatter(mask, kl)
        per_token = asft(out.log_probs, HeadTokens(out.log_probs, mask, ref_kl=ref_kl)) * mask
        loss = per_token.sum() / mask.sum().clamp(min=1)
        loss.backward()
        return loss

    def full_asft(hidden, ref_hidden, labels):
        if "head" not in reference_copy:  # the reference model's own copy (built once, resident, outside the step)
            reference_copy["head"] = model.lm_head.weight.detach().clone()
        logits = model(inputs_embeds=hidden).logits.float()
        with torch.no_grad():
            ref_logits = (ref_hidden @ reference_copy["head"].T).float()
        vocab = logits.size(-1)
        shift_logits = logits[:, :-1].contiguous().view(-1, vocab)
        shift_ref = ref_logits[:, :-1].contiguous().view(-1, vocab)
        shift_labels = labels[:, 1:].reshape(-1)
        valid = shift_labels != -100
        token_losses = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
        weights = torch.exp(-token_losses).detach()
        kl = F.kl_div(F.log_softmax(shift_logits, dim=-1), F.softmax(shift_ref, dim=-1), reduction="none").sum(-1)
        loss = (token_losses * weights + ALPHA * kl)[valid].mean()
        loss.backward()
        return loss

    return {"fused:nll": fused_nll, "fused:asft": fused_asft, "full:asft": full_asft}, reference_copy


def run_head(args, tokens: int) -> dict:
    from loss_memory import PeakMemory

    dtype = getattr(torch, args.dtype)
    weight, hidden, ref_hidden, labels = make_inputs(VOCAB, args.hidden, tokens, dtype, args.device)
    steps, reference_copy = build_cases(weight, args.device)
    memory = PeakMemory(args.device)
    samples = {case: {"s": [], "mib": [], "load": [], "loss": None} for case in CASES}
    for round_index in range(args.warmup + args.repeats):
        order = CASES if round_index % 2 == 0 else CASES[::-1]
        for case in order:
            leaf = hidden.detach().clone().requires_grad_(True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            memory.start()
            start = time.perf_counter()
            loss = steps[case](leaf, ref_hidden, labels)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = memory.stop()
            if round_index >= args.warmup:
                samples[case]["s"].append(elapsed)
                samples[case]["mib"].append(peak)
                samples[case]["load"].append(load())
                samples[case]["loss"] = loss.item()
            del loss, leaf
    out = {}
    for case, s in samples.items():
        out[case] = {
            "time_s": statistics.median(s["s"]), "peak_mib": statistics.median(s["mib"]), "times_s": s["s"],
            "peaks_mib": s["mib"], "load_1min": s["load"], "loss": s["loss"],
        }  # fmt: skip
    copy_mib = reference_copy["head"].numel() * reference_copy["head"].element_size() / 2**20
    for case in CASES:  # resident reference weights beside the step: only the full form keeps a second copy
        out[case]["reference_copy_mib"] = copy_mib if case == "full:asft" else 0.0
    for case in CASES:
        out[case]["time_x_fused_nll"] = out[case]["time_s"] / out["fused:nll"]["time_s"]
        out[case]["memory_x_fused_nll"] = out[case]["peak_mib"] / max(out["fused:nll"]["peak_mib"], 1e-9)
    out["full_over_fused_asft"] = {
        "memory": out["full:asft"]["peak_mib"] / out["fused:asft"]["peak_mib"],
        "memory_with_reference_copy": (out["full:asft"]["peak_mib"] + copy_mib) / out["fused:asft"]["peak_mib"],
        "time": out["full:asft"]["time_s"] / out["fused:asft"]["time_s"],
        "loss_rel_diff": abs(out["full:asft"]["loss"] - out["fused:asft"]["loss"]) / abs(out["full:asft"]["loss"]),
    }
    return out


# --------------------------------------------------------------------------------------------- part 2: SmolLM2 LoRA


def run_smollm2(args) -> dict:
    from smollm2_cost import gsm8k_rows, lora_config, step_args  # the SmolLM2 step benchmarks' one set-up
    from train_step import StepRecorder

    from trl_prob import ProbSFTConfig, ProbSFTTrainer
    from trl_prob.models import smollm2_dir

    model_dir = smollm2_dir()
    data = gsm8k_rows(args.rows * args.steps)
    workdir = tempfile.mkdtemp(prefix="trl-prob-asft-memory-")
    out = {}
    for objective in ("nll", "asft"):
        config = ProbSFTConfig(objective=objective, **step_args(os.path.join(workdir, objective), args.rows, args.steps,
                                                                args.max_length, learning_rate=1e-4, device=args.device))  # fmt: skip
        trainer = ProbSFTTrainer(model=model_dir, args=config, train_dataset=data, peft_config=lora_config())
        recorder = StepRecorder(args.device)
        loads = []

        class Load(__import__("transformers").TrainerCallback):
            def on_step_end(self, *a, **k):
                loads.append(load())

        trainer.add_callback(recorder)
        trainer.add_callback(Load())
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        out[objective] = {
            "step_s": recorder.periods, "step_s_median": statistics.median(recorder.periods),
            "peak_mib": recorder.peaks[1:], "peak_mib_median": statistics.median(recorder.peaks[1:]),
            "load_1min": loads[1:], "losses": [e["loss"] for e in logs],
            "reference_passes": getattr(trainer.asft_reference, "reference_passes", 0)
            if trainer.asft_reference is not None else 0,
        }  # fmt: skip
        print(f"smollm2 lora {objective:5s} step {out[objective]['step_s_median']:.2f} s  peak +"
              f"{out[objective]['peak_mib_median']:.0f} MiB  load {loads[1:]}", flush=True)  # fmt: skip
        del trainer
    out["asft_over_nll"] = {
        "time": out["asft"]["step_s_median"] / out["nll"]["step_s_median"],
        "memory": out["asft"]["peak_mib_median"] / out["nll"]["peak_mib_median"],
    }
    return out


# --------------------------------------------------------------------------------------------- main


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="head/hidden dtype (default float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size (896: Qwen2.5-0.5B; 3584: 7B)")
    parser.add_argument("--tokens", type=int, action="append", help="target tokens N (repeatable; CPU default 128 1024)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--rows", type=int, default=2, help="SmolLM2: rows per optimizer step")
    parser.add_argument("--max_length", type=int, default=128, help="SmolLM2: tokens per row at most")
    parser.add_argument("--steps", type=int, default=3, help="SmolLM2: optimizer steps per objective (first not timed)")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda") and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)], env)
    warnings.filterwarnings("ignore")
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("trl_prob").setLevel(logging.ERROR)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.tokens = args.tokens or [128, 1024]
    if not args.device.startswith("cuda"):
        torch.set_flush_denormal(True)  # as ProbSFTTrainer does on CPU, for every case

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(args.device), "torch_threads": torch.get_num_threads(), "dtype": args.dtype,
        "vocab": VOCAB, "hidden": args.hidden, "alpha": ALPHA, "load_at_start": load(), "head": {},
    }  # fmt: skip
    print(f"{'N':>6s} {'case':11s} {'time s':>8s} {'peak MiB':>9s} {'+ref copy':>9s} {'load':>6s}")
    for tokens in args.tokens:
        part = run_head(args, tokens)
        results["head"][str(tokens)] = part
        for case in CASES:
            r = part[case]
            print(f"{tokens:6d} {case:11s} {r['time_s']:8.2f} {r['peak_mib']:9.0f} {r['reference_copy_mib']:9.0f} "
                  f"{statistics.mean(r['load_1min']):6.2f}", flush=True)  # fmt: skip
        ratio = part["full_over_fused_asft"]
        print(f"{tokens:6d} full/fused asft: memory x{ratio['memory']:.2f} (x{ratio['memory_with_reference_copy']:.2f} "
              f"with the reference copy), time x{ratio['time']:.2f}, loss rel diff {ratio['loss_rel_diff']:.1e}", flush=True)  # fmt: skip
    if not args.skip_smollm2:
        results["smollm2_lora"] = run_smollm2(args)
        ratio = results["smollm2_lora"]["asft_over_nll"]
        print(f"smollm2 lora asft/nll: step time x{ratio['time']:.2f}, peak memory x{ratio['memory']:.2f}")
    results["load_at_end"] = load()
    out = args.out or os.path.join(RESULTS, "asft_memory.json" if not args.device.startswith("cuda") else "asft_memory_gpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
