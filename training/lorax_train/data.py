"""Training data: JSONL records -> token ids with the loss on completion tokens only.

A record is {"prompt": str, "completion": str, ...} (the prompt goes through the config's template, whose
format fields may name any other field of the record) or {"messages": [{"role", "content"}, ...]} ending with
the assistant's turn (rendered with the tokenizer's chat template). Records whose prompt alone reaches max_length
are skipped and counted; completions that run past it are cut."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

IGNORE = -100  # label of prompt and padding tokens


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclasses.dataclass
class Dataset:
    train: list[Example]
    val: list[Example]
    skipped: int  # prompts too long for max_length
    truncated: int  # completions cut at max_length


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path}: no such file")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise ValueError(f"data file {path} has no records (one JSON object per line expected)")
    return records


def prompt_and_completion(record: dict, template: str, tokenizer, where: str) -> tuple[str, str]:
    """The prompt text as the model sees it, and the completion text it learns to produce."""
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict)
                or messages[-1].get("role") != "assistant"):
            raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} ending with the "
                             "assistant's turn")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where}: chat 'messages' need a tokenizer with a chat template; this one has none "
                             "(use prompt / completion records with a --template instead)")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, str(messages[-1].get("content", ""))
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError(f"{where}: needs string fields 'prompt' and 'completion' (or chat 'messages'); "
                         f"got fields {sorted(record)}")
    try:
        return template.format(**record), completion
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{where}: the template {template!r} does not fit this record ({err!r})") from None


def encode(prompt: str, completion: str, tokenizer, max_length: int) -> tuple[Example | None, bool]:
    """(example, truncated); example None when the prompt leaves no room for a completion token."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        return None, False
    room = max_length - len(prompt_ids)
    truncated = len(completion_ids) > room
    completion_ids = completion_ids[:room]
    return Example(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids), truncated


def load_dataset(path: str | Path, tokenizer, template: str, max_length: int, val_fraction: float,
                 seed: int) -> Dataset:
    examples, skipped, truncated = [], 0, 0
    for number, record in enumerate(read_jsonl(path), 1):
        prompt, completion = prompt_and_completion(record, template, tokenizer, f"{path}: record {number}")
        example, cut = encode(prompt, completion, tokenizer, max_length)
        skipped += example is None
        truncated += cut
        if example is not None:
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: all {skipped} records have prompts of max_length ({max_length}) tokens or more; "
                         "raise --max-length")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(len(examples) * val_fraction)
    if val_fraction and n_val == 0:
        n_val = 1
    if n_val >= len(examples):
        raise ValueError(f"{path}: {len(examples)} usable records leave nothing to train on with "
                         f"val_fraction={val_fraction}")
    val = [examples[i] for i in order[:n_val]]
    return Dataset([examples[i] for i in order[n_val:]], val, skipped, truncated)


def batch_indices(num_examples: int, batch_size: int, index: int, seed: int) -> list[int]:
    """The examples of micro-batch `index` of the whole run: epochs of a fresh permutation each (seed + epoch),
    so a resumed run draws exactly the batches the uninterrupted one would."""
    per_epoch = max(1, num_examples // batch_size)
    epoch, position = divmod(index, per_epoch)
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[position * batch_size:(position + 1) * batch_size] or order[:batch_size]


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (padding ignored by the loss)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
        mask[row, :len(e.input_ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
