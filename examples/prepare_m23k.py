"""Turn UCSC-VLAA/m23k-tokenized into TRL prompt-completion data for recipes/medical/llama-3.1-8b-qlora.yaml.

m23k (23,493 medical multiple-choice questions with R1-distilled reasoning) ships the columns ``prompt`` (question
with its lettered options), ``reasoning``, ``distilled_answer_string``, ``answer_letter``, ``answer_string`` and a
``text`` column pre-rendered with *Qwen's* chat template. TRL cannot train on it as is: a ``prompt`` column without
``completion`` is neither of its formats, and ``text`` is in the wrong model's template. This script writes
``{"prompt", "completion"}`` rows, so TRL trains on the completion only, as the paper does.

- prompt: the question plus the paper's instruction ("Please reason step by step, and put your final answer within
  \\boxed{}."), in plain text (``--template plain``, default) or the paper's Llama-3 header layout
  (``--template llama3``; its header tokens are untrained in the *base* Llama-3.1-8B, which full fine-tuning fixes
  but LoRA on the linear layers does not).
- completion: ``distilled_answer_string`` (a concise explanation and the answer), which fits the paper's 800-token
  medical cut-off; ``--with_reasoning`` prepends the R1 reasoning (often thousands of tokens: raise max_length).

``--format messages`` writes ``{"messages": [user question, assistant completion]}`` rows instead, the format of
NuminaMath-CoT's ``messages``, so the two can be one ``datasets:`` mixture (recipes/mixture/); the model's chat template
then renders the turns and supplies the instruction (Qwen2.5-Math's default system prompt is the paper's instruction).

Usage::

    python examples/prepare_m23k.py --out data/m23k                      # needs the Hub once (or its cache)
    python examples/prepare_m23k.py --source local.jsonl --out data/m23k # same columns from a local file
    python examples/prepare_m23k.py --format messages --out data/m23k-messages   # for recipes/mixture/
"""

from __future__ import annotations

import argparse
import os

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = {
    "plain": ("Question: {question}\n{instruction}\nAnswer: ", "{completion}"),
    "llama3": (
        "<|start_header_id|>user<|end_header_id|>\n\n{question}\n{instruction}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "{completion}",
    ),
}


def to_prompt_completion(row: dict, template: str = "plain", with_reasoning: bool = False) -> dict:
    """One m23k row as a TRL prompt-completion example."""
    prompt_format, completion_format = TEMPLATES[template]
    answer = row["distilled_answer_string"].strip()
    completion = f"{row['reasoning'].strip()}\n\n{answer}" if with_reasoning else answer
    return {
        "prompt": prompt_format.format(question=row["prompt"].strip(), instruction=INSTRUCTION),
        "completion": completion_format.format(completion=completion),
    }


def to_messages(row: dict, with_reasoning: bool = False) -> dict:
    """One m23k row as a TRL conversational example: the question as the user turn, the completion as the assistant's."""
    completion = to_prompt_completion(row, with_reasoning=with_reasoning)["completion"]
    return {"messages": [{"role": "user", "content": row["prompt"].strip()}, {"role": "assistant", "content": completion}]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="UCSC-VLAA/m23k-tokenized", help="Hub id, or a local json/jsonl/parquet.")
    parser.add_argument("--out", default="data/m23k", help="Output directory (train.jsonl).")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="plain")
    parser.add_argument("--format", choices=["prompt_completion", "messages"], default="prompt_completion",
                        help="messages: user/assistant turns for a chat template (--template is then not used).")
    parser.add_argument("--with_reasoning", action="store_true", help="Prepend the R1 reasoning to the answer.")
    parser.add_argument("--limit", type=int, default=None, help="Keep the first N rows (quick trials).")
    args = parser.parse_args(argv)

    from datasets import load_dataset

    if args.source.endswith((".json", ".jsonl", ".parquet")):
        builder = "parquet" if args.source.endswith(".parquet") else "json"
        dataset = load_dataset(builder, data_files=args.source, split="train")
    else:
        dataset = load_dataset(args.source, split="train")
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    if args.format == "messages":
        convert, options = to_messages, {"with_reasoning": args.with_reasoning}
    else:
        convert, options = to_prompt_completion, {"template": args.template, "with_reasoning": args.with_reasoning}
    dataset = dataset.map(convert, fn_kwargs=options, remove_columns=dataset.column_names)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train.jsonl")
    dataset.to_json(path)
    print(f"{len(dataset)} examples -> {path}")


if __name__ == "__main__":
    main()
