"""The demo's base model: a word-level tokenizer over the tasks' vocabulary and a small Llama, briefly pre-trained
on generic text (all weights, about 40 s on 2 CPU cores), saved with `save_pretrained` so the engine and the
trainer load it like any Hugging Face model directory."""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from lorax_core.demo.tasks import pretraining_text, vocabulary

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
SIZE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def make_tokenizer():
    """Word-level: one token per vocabulary word (the tasks split on spaces), BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build_base(path: Path, steps: int = 600, seed: int = 0, device: str = "cpu", log=print) -> Path:
    """Writes the tokenizer and a pre-trained small Llama to `path`; returns it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False, **SIZE)
    model = LlamaForCausalLM(config).to(device)
    text = pretraining_text(4096, seed)
    batches = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    start, loss = time.perf_counter(), float("nan")
    for _ in range(steps):
        enc = tokenizer([batches.choice(text) + " </s>" for _ in range(32)], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()
    params = sum(p.numel() for p in model.parameters())
    log(f"base: Llama, {params / 1e6:.1f}M parameters, vocabulary {len(tokenizer)} words; pre-trained {steps} steps "
        f"on generic text in {time.perf_counter() - start:.0f} s (loss {loss:.2f})")
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
