"""Evaluation results for the LoRA Land page (`lorax-core serve --scores FILE`): the demo's results.json or a
`lorax-eval --json` file, read into one row per adapter name."""
from __future__ import annotations

import json
from pathlib import Path


def read_scores(path: str | Path) -> dict[str, dict]:
    """adapter name -> {"task", "base_score", "adapter_score" (points, 0-100), "examples": [prompt, ...]}.

    The demo's file has {"tasks": [{"task", "base_score", "adapter_score", "examples"?, "example"?}]}, its adapters
    named after their tasks. lorax-eval's has {"models": ["base", adapter, ...], "scores": {task: {model: 0..1}}}:
    an adapter's task is the one named like it, else the only task, else the one where it gains most over the
    base."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the scores file {path}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("tasks"), list):
        rows = {}
        for row in data["tasks"]:
            examples = list(row.get("examples") or ([row["example"]["prompt"]] if row.get("example") else []))
            rows[row["task"]] = dict(task=row["task"], base_score=float(row["base_score"]),
                                     adapter_score=float(row["adapter_score"]), examples=examples)
        return rows
    if isinstance(data, dict) and isinstance(data.get("scores"), dict) and isinstance(data.get("models"), list):
        scores, rows = data["scores"], {}
        for model in data["models"]:
            tasks = [t for t, by_model in scores.items() if model in by_model and "base" in by_model]
            if model == "base" or not tasks:
                continue
            task = model if model in tasks else tasks[0] if len(tasks) == 1 else max(
                tasks, key=lambda t: scores[t][model] - scores[t]["base"])
            rows[model] = dict(task=task, base_score=100.0 * scores[task]["base"],
                               adapter_score=100.0 * scores[task][model], examples=[])
        return rows
    raise ValueError(f"the scores file {path} is neither the demo's results.json (a \"tasks\" list) nor a "
                     "lorax-eval --json file (\"models\" and \"scores\")")
