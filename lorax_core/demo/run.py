"""The demo pipeline (see `lorax-core demo --help`): base -> data -> one adapter per task -> scores -> serving."""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from lorax_core import LLM, SamplingParams
from lorax_core.demo import tasks as T

GOAL_LIFT = 34.0  # points: the LoRA Land report's headline, fine-tuned adapters over their base
GREEDY = SamplingParams(max_tokens=8, temperature=0)  # scoring and serving alike, so their outputs compare


@dataclasses.dataclass
class DemoSettings:
    out: Path
    base: str | None = None  # a Hugging Face model directory or hub id; None: build the small demo base
    device: str | None = None  # default: cuda when present
    steps: int = 500  # optimizer steps per adapter
    batch_size: int = 16
    lr: float = 5e-3
    n_train: int = 2000
    n_test: int = 100
    base_steps: int = 600  # pre-training steps of the built base
    seed: int = 0
    quantize: str | None = "nf4"  # how the engine serves the base (the adapters were trained on an NF4 base)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _train_adapters(s: DemoSettings, base: str, data: Path, device: str, log) -> dict[str, dict]:
    from lorax_train.config import TrainConfig
    from lorax_train.trainer import train

    trained = {}
    for task in T.TASKS:
        # The lora-land preset (4-bit NF4 base, rank 8, alpha 16, dropout 0.05, all seven projections, cosine
        # schedule) with the demo's overrides: few steps, so a larger batch and learning rate; no gradient
        # checkpointing (the model is tiny) and no intermediate checkpoints.
        config = TrainConfig.build("lora-land", base=base, data=str(data / f"{task}.train.jsonl"),
                                   out=str(s.out / "adapters" / task), steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                                   seed=s.seed, save_every=0, gradient_checkpointing=False, device=device)
        start = time.perf_counter()
        result = train(config, resume=False, log=lambda _: None)
        seconds = time.perf_counter() - start
        log(f"adapter {task:<12} {s.steps} steps in {seconds:5.1f} s, last loss {result.last_loss:.3f}")
        trained[task] = dict(path=str(result.adapter_dir), steps=s.steps, train_seconds=round(seconds, 1),
                             last_loss=round(result.last_loss, 4))
    return trained


def _score(llm, tests: dict[str, list[dict]], trained: dict[str, dict]) -> tuple[list[dict], dict[str, list[str]]]:
    """Each task's test set on the base alone, then on its adapter alone: a row per task (scores in points) and
    the outputs ("base:TASK" and "TASK" -> texts)."""
    from lorax_train.evaluate import METRICS

    expected, rows = {}, []
    for task in T.TASKS:
        prompts, targets = [r["prompt"] for r in tests[task]], [r["completion"] for r in tests[task]]
        for key, adapter in ((f"base:{task}", None), (task, task)):
            expected[key] = [o.text for o in llm.generate(prompts, GREEDY, adapters=[adapter] * len(prompts))]
        base, tuned = (100.0 * sum(map(METRICS["exact"], expected[key], targets)) / len(prompts)
                       for key in (f"base:{task}", task))
        rows.append(dict(task=task, base_score=round(base, 1), adapter_score=round(tuned, 1),
                         lift=round(tuned - base, 1), n_test=len(prompts), metric="exact",
                         example=dict(prompt=prompts[0], completion=targets[0], base_output=expected[f"base:{task}"][0],
                                      adapter_output=expected[task][0]),
                         examples=prompts[:3],  # for the LoRA Land page (lorax-core serve --scores results.json)
                         **{k: v for k, v in trained[task].items() if k != "path"}))
    return rows, expected


def _serve(llm, tests: dict[str, list[dict]], expected: dict[str, list[str]], seed: int) -> dict:
    """Every test prompt of every task, with its task's adapter, plus each prompt once more on the base, shuffled
    into one request stream: the engine batches rows of all adapters together."""
    jobs = [(r["prompt"], task, expected[task][i]) for task in T.TASKS for i, r in enumerate(tests[task])]
    jobs += [(r["prompt"], None, expected["base:" + task][i]) for task in T.TASKS for i, r in enumerate(tests[task])]
    random.Random(seed).shuffle(jobs)
    start = time.perf_counter()
    outputs = llm.generate([p for p, _, _ in jobs], GREEDY, adapters=[a for _, a, _ in jobs])
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    same = sum(o.text == want for o, (_, _, want) in zip(outputs, jobs))
    return dict(requests=len(jobs), adapters=len(T.TASKS), base_requests=sum(a is None for _, a, _ in jobs),
                max_num_seqs=llm.config.max_num_seqs, generated_tokens=tokens, seconds=round(seconds, 3),
                tokens_per_s=round(tokens / seconds, 1), requests_per_s=round(len(jobs) / seconds, 1),
                same_as_single_adapter_runs=f"{same}/{len(jobs)}")


def run(s: DemoSettings, log=print) -> dict:
    from lorax_core.demo.base import build_base

    total = time.perf_counter()
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    base = s.base or str(build_base(s.out / "base", s.base_steps, s.seed, device, log))
    data = s.out / "data"
    data.mkdir(exist_ok=True)
    tests = {}
    for task in T.TASKS:
        train_records, tests[task] = T.make_task(task, s.n_train, s.n_test, s.seed)
        _write_jsonl(data / f"{task}.train.jsonl", train_records)
        _write_jsonl(data / f"{task}.test.jsonl", tests[task])
    log(f"data: {len(T.TASKS)} tasks, {s.n_train} training and {s.n_test} held-out test records each, in {data}")

    trained = _train_adapters(s, base, data, device, log)

    dtype = "bfloat16" if device == "cuda" else "float32"
    llm = LLM(base, dtype=dtype, quantize=s.quantize, device=device)
    try:
        for task in T.TASKS:
            llm.load_adapter(task, trained[task]["path"])
        rows, expected = _score(llm, tests, trained)
        serving = _serve(llm, tests, expected, s.seed)
    finally:
        llm.close()

    mean_lift, every_better = sum(r["lift"] for r in rows) / len(rows), all(r["lift"] > 0 for r in rows)
    summary = dict(mean_base_score=round(sum(r["base_score"] for r in rows) / len(rows), 1),
                   mean_adapter_score=round(sum(r["adapter_score"] for r in rows) / len(rows), 1),
                   mean_lift=round(mean_lift, 1), every_adapter_beats_base=every_better,
                   goal=f"mean lift >= {GOAL_LIFT:.0f} points and every adapter above the base",
                   goal_met=mean_lift >= GOAL_LIFT and every_better)
    results = dict(tasks=rows, summary=summary, serving=serving,
                   setup=dict(base=s.base or "built: small Llama, word-level tokenizer, pre-trained on generic text",
                              device=device, engine_dtype=dtype, engine_quantize=s.quantize, seed=s.seed,
                              trainer="lorax-train preset lora-land (4-bit NF4 base, rank 8, alpha 16, all "
                                      f"projections) with steps {s.steps}, batch_size {s.batch_size}, lr {s.lr}",
                              seconds=round(time.perf_counter() - total, 1)))
    (s.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log("\n" + table(results))
    return results


def table(results: dict) -> str:
    lines = ["| task | base | adapter | lift |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['base_score']:.1f} | {r['adapter_score']:.1f} | {r['lift']:+.1f} |"
              for r in results["tasks"]]
    s, v = results["summary"], results["serving"]
    lines += [f"| mean | {s['mean_base_score']:.1f} | {s['mean_adapter_score']:.1f} | {s['mean_lift']:+.1f} |", "",
              f"goal ({s['goal']}): {'met' if s['goal_met'] else 'NOT met'}",
              (f"serving: {v['requests']} requests over {v['adapters']} adapters and the base in one engine, "
               f"{v['generated_tokens']} tokens in {v['seconds']:.2f} s = {v['tokens_per_s']:.0f} tokens/s "
               f"({v['requests_per_s']:.0f} requests/s); outputs equal to the one-adapter runs: "
               f"{v['same_as_single_adapter_runs']}")]
    return "\n".join(lines)
