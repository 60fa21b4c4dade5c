"""Tiny random Llama / Mistral / Qwen2 checkpoints with a tokenizer, and PEFT adapters for them (built here,
saved with save_pretrained, so the engine loads them exactly as it would load a downloaded model)."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a one two three four five six seven eight nine ten red green blue cat dog bird tree house car "
         "sun moon star is was and or not yes no up down left right big small hot cold fast slow").split()
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig keywords: ranks 4, 8, 16; one rsLoRA; one on some modules only; one with a rank pattern
ADAPTERS = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8_all": dict(r=8, lora_alpha=16, target_modules=ALL_MODULES),
    "r16_rslora": dict(r=16, lora_alpha=32, target_modules=ALL_MODULES, use_rslora=True),
    "r8_pattern": dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"],
                       rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 32}),
}

# a batch of nine requests: every adapter, some twice, and base-model rows among them
MIXED_ROWS = ["r8_all", None, "r16_rslora", "r4_qv", "r8_pattern", None, "r8_all", "r16_rslora", None]


def hf_config(kind: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    extra = {"mistral": dict(sliding_window=8)}.get(kind, {})
    return cls(**{**TINY, **extra, **overrides}, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_tokenizer():
    """A small BPE tokenizer trained on the word list (ids 0..3 are <pad>, <s>, </s>, <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20 + WORDS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def save_model(path: Path, kind: str = "llama", seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides)).eval()
    model.save_pretrained(path)
    if tokenizer:
        make_tokenizer().save_pretrained(path)
    return path


def save_adapter(base_dir: Path, path: Path, seed: int = 0, **lora) -> Path:
    """A PEFT LoRA adapter with random (nonzero) A and B on the base in base_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora))
    with torch.no_grad():  # PEFT's random B is small; make each adapter's effect clearly visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


def save_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    """Every ADAPTERS adapter of this base, saved under root / its name (seeded by its place in ADAPTERS)."""
    return {name: save_adapter(base_dir, root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(ADAPTERS.items())}


def bnb_config():
    """transformers' bitsandbytes 4-bit: NF4 with double quantization, fp32 compute (the oracle for NF4 bases)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def bnb_in_fp32(model):
    """The model with every bitsandbytes 4-bit layer computing in its compute dtype. On a CPU with AVX512-BF16,
    bitsandbytes (0.50) repacks an eval-mode layer's weight at its first call and then multiplies in bf16 whatever
    the compute dtype: about 1e-2 off fp32 instead of 1e-6. The oracle wants the fp32 product."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def hf_peft_model(base_dir: Path, adapters: dict[str, Path], **load_kwargs):
    """transformers + PEFT with every adapter loaded (the oracle); select one with set_adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = bnb_in_fp32(AutoModelForCausalLM.from_pretrained(base_dir, **load_kwargs).eval())
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


@torch.no_grad()
def hf_logits(model, token_ids: list[int], adapter: str | None) -> torch.Tensor:
    """Logits [len, vocab] of the PEFT model with one adapter (None: the base)."""
    ids = torch.tensor([token_ids])
    if adapter is None:
        with model.disable_adapter():
            return model(ids).logits[0].float()
    model.set_adapter(adapter)
    return model(ids).logits[0].float()


def hf_greedy(model, token_ids: list[int], adapter: str | None, steps: int) -> list[int]:
    ids = list(token_ids)
    for _ in range(steps):
        ids.append(int(hf_logits(model, ids, adapter)[-1].argmax()))
    return ids[len(token_ids):]


@torch.no_grad()
def hf_greedy_mixed(model, prompts: list[list[int]], adapters: list[str | None], steps: int) -> list[list[int]]:
    """hf_greedy for many requests at once: PEFT's mixed-adapter batches (adapter_names), one batch per prompt
    length (no padding, so each row computes exactly what it would alone)."""
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        ids = torch.tensor([prompts[i] for i in rows])
        names = [adapters[i] or "__base__" for i in rows]
        for _ in range(steps):
            nxt = model(ids, adapter_names=names).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
        for row, i in enumerate(rows):
            out[i] = ids[row, len(prompts[i]):].tolist()
    return out
