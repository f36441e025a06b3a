"""Bad training data, found before training and said in one line naming the row and the field.

TRL trains silently on rows that carry nothing to learn (an empty completion: only the EOS token is trained; a
conversation without an assistant turn), fails deep inside preparation on a row without a key (``AttributeError:
'NoneType' object has no attribute 'endswith'``), and ``datasets`` reports a broken JSON-lines file without saying
which file or line. :func:`check_rows` scans a split column by column with pyarrow (no Python loop over rows);
:func:`locate_load_error` finds the file and line a failed load choked on.
"""

from __future__ import annotations

import logging

import glob
import json
import os
import re

import pyarrow as pa
import pyarrow.compute as pc

SHOWN = 3  # rows named in one line


class DataError(ValueError):
    """A row of the data cannot be trained on (one line: split, row, field, what is wrong)."""


logger = logging.getLogger("trl_prob.trainer")  # the trainer's logger: its lines have always come from there

def _rows_text(rows: list[int]) -> str:
    first = ", ".join(str(r) for r in rows[:SHOWN])
    more = f" and {len(rows) - SHOWN:,} more" if len(rows) > SHOWN else ""
    return f"row {first}{more}" if len(rows) == 1 else f"rows {first}{more}"


def _is_messages(column: pa.ChunkedArray) -> bool:
    kind = column.type
    return pa.types.is_list(kind) and pa.types.is_struct(kind.value_type) and kind.value_type.get_field_index("role") >= 0


def _blank_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.equal(pc.utf8_trim_whitespace(column), "")


def _rows_without_assistant(column: pa.ChunkedArray) -> list[int]:
    """Rows whose message list has no assistant message with non-blank content (null rows excluded)."""
    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    parents = pc.list_parent_indices(flat)
    messages = pc.list_flatten(flat)
    is_assistant = pc.equal(pc.struct_field(messages, "role"), "assistant")
    if messages.type.get_field_index("content") >= 0:
        content = pc.struct_field(messages, "content")
        if pa.types.is_string(content.type) or pa.types.is_large_string(content.type):
            is_assistant = pc.and_kleene(is_assistant, pc.invert(pc.fill_null(_blank_strings(content), True)))
    answered = set(pc.filter(parents, pc.fill_null(is_assistant, False)).to_pylist())
    valid = pc.is_valid(flat).to_pylist()
    return [row for row in range(len(flat)) if valid[row] and row not in answered]


def _first_invalid_utf8(column) -> int | None:
    """The first row of ``column`` holding bytes that are not UTF-8 (the JSON reader stores them unchecked)."""
    try:
        column.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    for row in range(len(column)):
        try:
            column[row].as_py()
        except UnicodeDecodeError:
            return row
    return None


def check_rows(dataset, split: str = "train", text_field: str = "text", batch_size: int = 65536) -> None:
    """Raise :class:`DataError` on the first kind of bad row found in ``dataset`` (a ``datasets.Dataset``).

    Checked: text that is not UTF-8, a row without a key the format needs (``prompt`` / ``completion``, ``messages``, or the text field), an
    empty or whitespace-only completion (or text), a conversational completion or ``messages`` list without an
    assistant turn. Streaming datasets are not scanned (they would be read twice).
    """
    if dataset is None or not hasattr(dataset, "with_format") or not hasattr(dataset, "__len__"):
        return
    columns = set(dataset.column_names or ())
    if "completion" in columns:
        fields = ["prompt", "completion"] if "prompt" in columns else ["completion"]
    elif "messages" in columns:
        fields = ["messages"]
    elif text_field in columns:
        fields = [text_field]
    else:
        return  # a format TRL itself recognises or rejects (prompt only, images, pre-tokenized input_ids)
    problems: dict[tuple[str, str], list[int]] = {}
    offset = 0
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        for field in fields:
            column = batch[field]
            bad_text = _first_invalid_utf8(column)
            if bad_text is not None:
                raise DataError(
                    f"{split} row {offset + bad_text}: {field!r} is not valid UTF-8 text; save the data as UTF-8."
                )
            missing = pc.is_null(column)
            if field == "messages" or _is_messages(column):
                bad = _rows_without_assistant(column) if field != "prompt" else []
                problems.setdefault((field, "no_assistant"), []).extend(offset + r for r in bad)
            elif field != "prompt" and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                blank = pc.fill_null(_blank_strings(column), False)
                problems.setdefault((field, "blank"), []).extend(
                    offset + r for r in pc.indices_nonzero(blank).to_pylist()
                )
            problems.setdefault((field, "missing"), []).extend(
                offset + r for r in pc.indices_nonzero(missing).to_pylist()
            )
        offset += batch.num_rows
    for (field, kind), rows in problems.items():
        if not rows:
            continue
        where = f"{split} {_rows_text(rows)}"
        if kind == "missing":
            raise DataError(f"{where}: no {field!r} (the key is missing or null); every row needs one.")
        if kind == "blank":
            example = dataset[rows[0]][field]
            raise DataError(
                f"{where}: {field!r} is empty or whitespace only ({example!r}): nothing to train on; fill it in or "
                "drop the row."
            )
        raise DataError(
            f"{where}: {field!r} has no assistant turn (a message with role 'assistant' and some content): nothing "
            "to train on; add the answer or drop the row."
        )


# ---------------------------------------------------------------------------------------------------- loading


def data_files(path: str) -> list[str]:
    """The JSON / JSON-lines files ``datasets`` would read for a local ``--dataset_name`` (a file or a directory)."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = [f for ext in ("json", "jsonl") for f in glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True)]
        return sorted(found)
    return []


def locate_load_error(path: str) -> str | None:
    """Where a local JSON-lines dataset is broken: ``FILE line N: what``, or None if nothing is found (or the files
    are not JSON lines)."""
    for name in data_files(path):
        with open(name, "rb") as f:
            if name.endswith(".json") and f.read(1).lstrip() == b"[":
                continue  # one JSON document, not JSON lines
            f.seek(0)
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return (f"{name} line {number}: not UTF-8 (byte {raw[exc.start:exc.start + 1]!r} at column "
                            f"{exc.start + 1}); save the file as UTF-8.")  # fmt: skip
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    return f"{name} line {number}: not JSON ({exc.msg} at column {exc.colno}); one JSON object per line."
                if not isinstance(row, dict):
                    return f"{name} line {number}: a JSON {type(row).__name__}, not an object; one object per line."
    return None


def empty_files(path: str) -> list[str]:
    """The data files of a local dataset that hold no row."""
    empty = []
    for name in data_files(path):
        with open(name, "rb") as f:
            if not any(line.strip() for line in f):
                empty.append(name)
    return empty


# ---------------------------------------------------------------------------------------------------- truncation


def first_prompt_over(dataset, processing_class, max_length: int, batch_size: int = 1024) -> tuple[int, int] | None:
    """``(row, tokens)`` of the first row whose prompt alone is ``max_length`` tokens or more (TRL's rendering: the
    prompt string tokenized, or a conversational prompt through the chat template with the generation prompt); None
    if there is none or the rows have no ``prompt``."""
    if dataset is None or "prompt" not in (getattr(dataset, "column_names", None) or ()) or not hasattr(dataset, "iter"):
        return None
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    offset = 0
    for batch in dataset.select_columns(["prompt"]).iter(batch_size=batch_size):
        prompts = batch["prompt"]
        if prompts and isinstance(prompts[0], str):
            lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        else:
            lengths = [
                len(processing_class.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                    ["input_ids"]) if p else 0
                for p in prompts
            ]  # fmt: skip
        for row, n in enumerate(lengths):
            if n >= max_length:
                return offset + row, n
        offset += len(prompts)
    return None


ASSISTANT_ONLY_LOSS_ADVICE = (
    "assistant_only_loss needs {% generation %} markers in the chat template to find the assistant turns. For a model "
    "whose template has none (SmolLM2, many others): give the data as conversational prompt/completion rows (prompt: "
    "the messages before the answer; completion: the assistant turn) and drop assistant_only_loss: TRL's default "
    "completion_only_loss then trains exactly the assistant turn. Or pass --chat_template_path with a template that "
    "has the markers."
)


def check_datasets(train, evaluation, text_field: str) -> None:
    """:func:`check_rows` on the training data and every evaluation dataset (a dict of them, or one)."""
    check_rows(train, "train", text_field)
    for name, dataset in evaluation.items() if isinstance(evaluation, dict) else [("eval", evaluation)]:
        check_rows(dataset, name, text_field)


def check_assistant_only(args, processing_class) -> None:
    """``assistant_only_loss`` with a chat template that has no ``{% generation %}`` markers: one line saying what to
    do instead, before TRL tokenises anything (a template given by path is checked by TRL itself)."""
    if not getattr(args, "assistant_only_loss", False) or getattr(args, "chat_template_path", None):
        return
    template = getattr(processing_class, "chat_template", None)
    if isinstance(template, str) and not re.search(r"{%-?\s*generation\s*-?%}", template):
        raise ValueError(f"The chat template has no {{% generation %}} markers. {ASSISTANT_ONLY_LOSS_ADVICE}")


def truncation_check(raw, prepared, args, processing_class, warn: bool = True) -> int | None:
    """Rows that ``max_length`` cuts, said before any step: completions cut short are one warning line (their end and
    EOS are not trained). Returns the number of raw rows when none is left to train (the trainer refuses to start;
    TRL would fail in its sampler; the probe reports it in its own words), else None."""
    if args.packing or args.max_length is None or (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return None
    if not (hasattr(raw, "__len__") and hasattr(prepared, "__len__")):
        return None
    dropped = len(raw) - len(prepared)
    if len(raw) and not len(prepared):
        return len(raw)
    if "input_ids" not in (prepared.column_names or ()):
        return None
    import pyarrow.compute as pc

    lengths = pc.list_value_length(prepared.with_format("arrow")["input_ids"])
    cut = pc.sum(pc.greater_equal(lengths, args.max_length)).as_py() or 0
    if (cut or dropped) and warn:
        lost = f", and leaves {dropped:,} more without any completion token (TRL drops them" if dropped else ""
        if dropped:
            found = first_prompt_over(raw, processing_class, args.max_length)
            if found is not None:  # name one, and what truncation does to it
                lost += (f"; row {found[0]}: its 'prompt' alone is {found[1]} tokens, and truncation_mode="
                         f"{args.truncation_mode!r} keeps only its "
                         f"{'first' if args.truncation_mode == 'keep_start' else 'last'} {args.max_length}")  # fmt: skip
            lost += ")"
        logger.warning(
            "trl-prob: max_length=%d cuts %d of %d training rows short (the end of the completion and its EOS are "
            "not trained)%s; raise --max_length to train them whole.", args.max_length, cut, len(raw), lost
        )
    return None
