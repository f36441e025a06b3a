"""QLoRA with the probability-based objective: a 4-bit (NF4) base model, LoRA adapters, the adaptive schedule.

The same three ingredients as TRL's QLoRA (a ``BitsAndBytesConfig``, a ``LoraConfig``, ``SFTTrainer``), with
``ProbSFTTrainer`` / ``ProbSFTConfig``. It runs on the embedded default on a CPU (bitsandbytes >= 0.45 quantises
on CPU; compute in float32 there); on a GPU use ``compute_dtype=torch.bfloat16`` and ``bf16=True``.

    python examples/qlora.py --max_steps 5
    python examples/qlora.py --model_name_or_path Qwen/Qwen2.5-Math-7B --dataset_name ...  # a real model, on a GPU
"""

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_prob import ProbSFTConfig, ProbSFTTrainer
from trl_prob.embedded import default_dataset_path, default_model_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=default_model_path())
    parser.add_argument("--dataset_name", default=default_dataset_path())
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--output_dir", default="runs/qlora")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    compute_dtype = torch.bfloat16 if on_gpu else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    config = ProbSFTConfig(
        output_dir=args.output_dir,
        objective="p",
        objective_schedule="adaptive",
        model_init_kwargs={"dtype": compute_dtype},
        learning_rate=2e-3,                # adapters on a 0.13M-parameter model; ~1e-4 for a 7B model
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,    # the adaptive schedule's warm start measures 256 samples in eval batches
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=on_gpu,
    )
    trainer = ProbSFTTrainer(
        model=args.model_name_or_path,     # loaded by TRL with the quantization config, then wrapped with LoRA
        args=config,
        train_dataset=load_dataset(args.dataset_name, split="train"),
        quantization_config=quantization,
        peft_config=lora,
    )
    trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.save_model()                   # the adapter only: adapter_config.json + adapter_model.safetensors

    # Reload: the 4-bit base model plus the saved adapter.
    base = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, quantization_config=quantization, dtype=compute_dtype
    )
    model = PeftModel.from_pretrained(base, args.output_dir)
    print(f"reloaded {type(model).__name__} with adapter from {args.output_dir}")


if __name__ == "__main__":
    main()
