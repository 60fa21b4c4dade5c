"""Score a base model and its adapters on a JSONL test set through the engine, per task, as the LoRA Land tables
do: one row per task, one column for the base and one per adapter.

Records are the training format ({"prompt", "completion"} or {"messages"}); an optional "task" field groups them
(default: the file's name). The metric compares the greedy output with the completion: `exact` (after trimming
whitespace) or `contains` (the completion appears in the output)."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from lorax_train.data import prompt_and_completion, read_jsonl

METRICS = {
    "exact": lambda output, target: output.strip() == target.strip(),
    "contains": lambda output, target: target.strip() in output,
}


@dataclasses.dataclass
class EvalResult:
    models: list[str]  # "base", then the adapter names
    scores: dict[str, dict[str, float]]  # task -> model -> score in [0, 1]
    counts: dict[str, int]  # task -> records
    outputs: dict[str, list[str]]  # model -> generated text per record

    def table(self) -> str:
        lines = ["| task | n | " + " | ".join(self.models) + " |", "|---|---|" + "---|" * len(self.models)]
        for task in sorted(self.scores):
            cells = " | ".join(f"{self.scores[task][m]:.3f}" for m in self.models)
            lines.append(f"| {task} | {self.counts[task]} | {cells} |")
        return "\n".join(lines)


def evaluate(base: str, data: str | Path, adapters: dict[str, str], template: str = "{prompt}",
             metric: str = "exact", max_tokens: int = 64, quantize: str | None = None, device: str | None = None,
             dtype: str = "auto", llm=None) -> EvalResult:
    """Greedy outputs of the base and of every adapter on every record, all in one engine (mixed batches)."""
    from lorax_core import LLM, SamplingParams

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    llm = llm or LLM(base, dtype=dtype, quantize=quantize, device=device)
    if llm.tokenizer is None:
        raise ValueError(f"{base}: lorax-eval needs a tokenizer in the model directory")
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    records = read_jsonl(data)
    default_task = Path(data).stem
    pairs = [prompt_and_completion(r, template, llm.tokenizer, f"{data}: record {i}") for i, r in
             enumerate(records, 1)]
    tasks = [str(r.get("task", default_task)) for r in records]
    models = ["base", *adapters]
    prompts = [prompt for prompt, _ in pairs] * len(models)
    which = [m if m != "base" else None for m in models for _ in pairs]
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    outputs = llm.generate(prompts, params, adapters=which)
    texts = {m: [o.text for o in outputs[k * len(pairs):(k + 1) * len(pairs)]] for k, m in enumerate(models)}
    hits: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    counts: dict[str, int] = defaultdict(int)
    for i, (task, (_, target)) in enumerate(zip(tasks, pairs)):
        counts[task] += 1
        for m in models:
            hits[task][m] += METRICS[metric](texts[m][i], target)
    scores = {t: {m: hits[t][m] / counts[t] for m in models} for t in counts}
    return EvalResult(models, scores, dict(counts), texts)
