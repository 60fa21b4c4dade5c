"""The training loop: a PEFT LoRA on a (4-bit NF4) transformers base, AdamW with a cosine schedule, resumable
checkpoints that restore the exact run (weights, optimizer, schedule, RNG, position in the data), and a standard
PEFT adapter directory at the end."""
from __future__ import annotations

import dataclasses
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from lorax_train.config import TrainConfig
from lorax_train.data import Dataset, Example, batch_indices, collate, load_dataset

STATE_FILE = "trainer_state.pt"


@dataclasses.dataclass
class TrainResult:
    adapter_dir: Path
    steps: int  # optimizer steps done in total (all runs)
    finished: bool  # False when stopped early by stop_after (the run can be resumed)
    last_loss: float
    val_loss: float | None
    skipped: int  # records skipped (prompt too long)
    truncated: int  # completions cut at max_length


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_base_and_tokenizer(config: TrainConfig, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorax_core.model import resolve_model_dir

    base_dir = resolve_model_dir(config.base, "base model")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{base_dir}: the tokenizer has no EOS token; the adapter could not learn where to stop")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict = {"dtype": dtype}
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if not config.load_in_4bit:
        model.to(device)
    return model, tokenizer, base_dir


def add_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.load_in_4bit:  # norms and embeddings to fp32, base frozen
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        # transformers 5.x renamed gradient_checkpointing_enable (now a deprecated alias); older ones lack the new name
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # so checkpointed blocks see an input that requires grad
    known = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in config.target_modules if m not in known]
    if missing:
        raise ValueError(f"target modules {missing} are not in this model (its modules include "
                         f"{sorted(n for n in known if n.endswith('proj'))})")
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def schedule(optimizer, config: TrainConfig):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * config.steps), config.steps)


@torch.no_grad()
def mean_loss(model, examples: list[Example], batch_size: int, pad_id: int, device: torch.device) -> float:
    """Token-weighted mean loss over the completion tokens of `examples` (eval mode: no dropout)."""
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, device)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(model, optimizer, scheduler, step: int, config: TrainConfig, out: Path) -> None:
    path = out / "checkpoints" / f"step-{step:08d}"
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "config": dataclasses.asdict(config)}
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a checkpoint exists completely or not at all
    for old in checkpoints(out)[:-config.keep_checkpoints]:
        shutil.rmtree(old)


def restore(model, optimizer, scheduler, path: Path, config: TrainConfig) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(path / STATE_FILE, weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in ("steps", "save_every", "eval_every", "out",
                                                                     "keep_checkpoints", "device")}
    now = {k: v for k, v in dataclasses.asdict(config).items() if k in saved}
    changed = sorted(k for k in saved if saved[k] != now[k])
    if changed:
        raise ValueError(f"checkpoint {path} was made with other settings ({', '.join(changed)}); resume with the "
                         "same settings, or start a new run in another --out directory")
    weights = load_file(path / "adapter_model.safetensors")
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                disable=not sys.stderr.isatty())


def train(config: TrainConfig, resume: bool = True, stop_after: int | None = None, log=print) -> TrainResult:
    """Fine-tune; with resume=True a run continues from the newest checkpoint in config.out. stop_after ends this
    call after that many optimizer steps (with a checkpoint), as an interruption would."""
    if not config.out:
        raise ValueError("an output directory is required (--out DIR)")
    out = Path(config.out)
    device = resolve_device(config.device)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer, base_dir = load_base_and_tokenizer(config, device)
    data: Dataset = load_dataset(config.data, tokenizer, config.template, config.max_length, config.val_fraction,
                                 config.seed)
    if data.skipped or data.truncated:
        log(f"data: {data.skipped} records skipped (prompt of {config.max_length} tokens or more), "
            f"{data.truncated} completions cut at {config.max_length} tokens")
    model = add_lora(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = schedule(optimizer, config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    start = 0
    found = checkpoints(out) if resume else []
    if found:
        start = restore(model, optimizer, scheduler, found[-1], config)
        log(f"resumed from {found[-1]} at step {start}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_config.json").write_text(config.to_json())
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    log(f"training {base_dir.name}: {len(data.train)} examples ({len(data.val)} validation), steps {start}..{end} "
        f"of {config.steps}, rank {config.rank}, lr {config.lr}, {'NF4 4-bit' if config.load_in_4bit else 'full'} "
        f"base on {device}")

    bar, loss_value, val_loss = progress(config.steps, start), math.nan, None
    every = 0 if not bar.disable else max(1, (end - start) // 20)  # log lines instead of a bar when not a terminal
    tokens, clock = 0, time.perf_counter()
    for step in range(start, end):
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            index = step * config.grad_accum + micro
            batch = collate([data.train[i] for i in batch_indices(len(data.train), config.batch_size, index,
                                                                   config.seed)], pad_id, device)
            loss = model(**batch).loss / config.grad_accum
            loss.backward()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss_sum
        done = step + 1
        if data.val and config.eval_every and done % config.eval_every == 0:
            val_loss = mean_loss(model, data.val, config.batch_size, pad_id, device)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens / (time.perf_counter() - clock):.0f}",
                        **({"val": f"{val_loss:.4f}"} if val_loss is not None else {}))
        if every and (done - start) % every == 0:
            log(f"step {done}/{config.steps} loss {loss_value:.4f} "
                f"{tokens / (time.perf_counter() - clock):.0f} tokens/s" + (f" val {val_loss:.4f}" if val_loss else ""))
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            save_checkpoint(model, optimizer, scheduler, done, config, out)
    bar.close()
    finished = end == config.steps
    if not finished:
        if not (config.save_every and end % config.save_every == 0):
            save_checkpoint(model, optimizer, scheduler, end, config, out)
        return TrainResult(out, end, False, loss_value, val_loss, data.skipped, data.truncated)
    if data.val:
        val_loss = mean_loss(model, data.val, config.batch_size, pad_id, device)
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
    log(f"adapter saved to {out} after {end} steps; last loss {loss_value:.4f}"
        + (f", validation loss {val_loss:.4f}" if val_loss is not None else ""))
    return TrainResult(out, end, True, loss_value, val_loss, data.skipped, data.truncated)
