"""Read and validate a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) against
the base model it will be served with. Every refusal is a ValueError that names the adapter and the fix."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight")
# adapter_config.json fields whose non-default values change the math in ways the kernels do not implement
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer_replication",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)",
    "lora_bias": "lora_bias",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
}


@dataclasses.dataclass
class AdapterSpec:
    """A validated adapter on disk, from its adapter_config.json and safetensors header (no tensor read yet)."""

    name: str
    path: Path
    scale: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    rank: int  # the largest rank of any module
    target_modules: tuple[str, ...]
    ranks: dict[tuple[int, str], int]  # (layer, module) -> rank
    keys: dict[tuple[int, str], tuple[str, str]]  # (layer, module) -> (lora_A key, lora_B key)
    b_factors: dict[tuple[int, str], float]  # per-module scale / adapter scale (rank / alpha patterns), folded into B
    file_bytes: int


@dataclasses.dataclass
class AdapterWeights:
    """A validated adapter in host memory: weights[(layer, module)] = (A [r, in], B [out, r]) with any
    per-module scale difference (rank_pattern / alpha_pattern) folded into B, and the adapter's scale."""

    name: str
    path: Path
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scale: float
    rank: int
    target_modules: tuple[str, ...]


def inspect_peft_adapter(name: str, path: str | Path, modules: dict[str, tuple[int, int]], num_layers: int,
                         max_rank: int) -> AdapterSpec:
    """Validate a PEFT LoRA adapter directory for a base model whose projections are `modules` (PEFT name ->
    (in, out)), reading only its config and the safetensors header."""
    path = Path(path)

    def refuse(problem: str, fix: str):
        raise ValueError(f"adapter {name!r} ({path}): {problem}; {fix}")

    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        refuse("adapter_config.json not found", "point load_adapter at a PEFT adapter directory (save_pretrained output)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        refuse(f"adapter_config.json is not valid JSON ({err})", "re-save the adapter with PEFT")
    if not isinstance(config, dict):
        refuse(f"adapter_config.json holds a {type(config).__name__}, not an object of settings", "re-save the adapter")
    if config.get("peft_type") != "LORA":
        refuse(f"peft_type is {config.get('peft_type')!r}, only LORA adapters are served", "train a LoRA adapter")
    for key, feature in _UNSUPPORTED.items():
        if config.get(key) not in (None, False, [], {}, ""):
            refuse(f"uses {feature}, which lorax-core does not serve", "retrain the adapter without it")
    if config.get("bias", "none") != "none":
        refuse(f"trains biases (bias={config['bias']!r}), which lorax-core does not serve", "retrain with bias='none'")
    if not weights_file.is_file():
        hint = " (found adapter_model.bin: re-save with safe_serialization=True)" if (path / "adapter_model.bin").exists() else ""
        refuse(f"adapter_model.safetensors not found{hint}", "save the adapter with PEFT's save_pretrained")
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for truncated / corrupt files
        refuse(f"adapter_model.safetensors cannot be read ({type(err).__name__}: {err})",
               "the file is corrupt or truncated; copy or re-save it")

    r, alpha, rslora = config.get("r", 8), config.get("lora_alpha", 8), bool(config.get("use_rslora"))
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        refuse(f"adapter_config.json has r={r!r}, which is not a rank (an integer >= 1)", "set r to the rank trained")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha != 0):
        refuse(f"adapter_config.json has lora_alpha={alpha!r}: the adapter's scale alpha / r must be a nonzero "
               "number (0 would change nothing)", "set lora_alpha to the value trained with (PEFT's default is 8)")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            refuse(f"{field} is a {type(patterns).__name__}, not a mapping of module patterns", "re-save the adapter")
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as err:
                refuse(f"{field} key {key!r} is not a valid pattern ({err})", "re-save the adapter")
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                refuse(f"{field}[{key!r}] = {value!r} is not a positive number", "re-save the adapter")

    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        match = _KEY.fullmatch(key)
        if match is None:
            refuse(f"tensor {key!r} is not a LoRA A/B weight of a decoder projection (embedding, lm_head or "
                   "DoRA weights are not served)", "retrain targeting only q/k/v/o/gate/up/down projections")
        layer, module, ab = int(match[1]), match[2], match[3]
        if module not in modules:
            refuse(f"targets {module!r}, not a projection of this model ({', '.join(modules)})",
                   "retrain with target_modules among those")
        if layer >= num_layers:
            refuse(f"has weights for layer {layer}, the base model has {num_layers} layers",
                   "use the base model the adapter was trained on")
        pair = pairs.setdefault((layer, module), {})
        if ab in pair:
            refuse(f"has two lora_{ab} weights for layer {layer} {module} ({pair[ab]!r} and {key!r})",
                   "keep one adapter per directory (PEFT saves each adapter of a model in its own)")
        pair[ab] = key
    if not pairs:
        refuse("has no LoRA weights", "save the adapter after training")

    scale = alpha / (math.sqrt(r) if rslora else r)
    ranks, keys, factors = {}, {}, {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            refuse(f"layer {layer} {module} has lora_{''.join(ab)} but not both A and B", "re-save the adapter")
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        n_in, n_out = modules[module]
        rank = a[0] if len(a) == 2 else -1
        if len(a) != 2 or len(b) != 2 or a[1] != n_in or b != (n_out, rank):
            refuse(f"layer {layer} {module} has A {a} and B {b}, this base model needs A [r, {n_in}] and B "
                   f"[{n_out}, r]", "the adapter was trained for another base model; use that one")
        full = f"model.layers.{layer}.{'self_attn' if module[0] in 'qkvo' else 'mlp'}.{module}"
        expected = _pattern(config.get("rank_pattern"), full, r)
        if rank != expected:
            refuse(f"layer {layer} {module} has weights of rank {rank}, adapter_config.json says {expected} (r or "
                   "rank_pattern; PEFT refuses this adapter too)", "re-save the adapter with PEFT")
        if rank > max_rank:
            refuse(f"rank {rank} is above the engine's max_lora_rank {max_rank}", "raise max_lora_rank")
        m_alpha = float(_pattern(config.get("alpha_pattern"), full, alpha))
        ranks[(layer, module)], keys[(layer, module)] = rank, (ab["A"], ab["B"])
        factors[(layer, module)] = m_alpha / (math.sqrt(rank) if rslora else rank) / scale
    target = tuple(sorted({m for _, m in ranks}))
    return AdapterSpec(name, path, scale, max(ranks.values()), target, ranks, keys, factors,
                       weights_file.stat().st_size)


def load_peft_adapter(spec: AdapterSpec) -> AdapterWeights:
    """Read a validated adapter's tensors (ValueError naming the adapter if the file broke or changed since)."""
    try:
        with safe_open(str(spec.path / "adapter_model.safetensors"), framework="pt") as f:
            weights = {}
            for key, (a_key, b_key) in spec.keys.items():
                a, b = f.get_tensor(a_key), f.get_tensor(b_key)
                if a.shape[0] != spec.ranks[key] or b.shape[1] != spec.ranks[key]:
                    raise ValueError(f"{a_key} changed shape since the adapter was registered")
                factor = spec.b_factors[key]
                weights[key] = (a, b.float() * factor if factor != 1 else b)
    except Exception as err:  # a missing key, a changed shape, a truncated or replaced file
        raise ValueError(f"adapter {spec.name!r} ({spec.path}): adapter_model.safetensors cannot be loaded "
                         f"({type(err).__name__}: {err}); it changed or broke after load_adapter: restore the file "
                         "and register it again with load_adapter") from None
    broken = [spec.keys[key][0].rsplit(".lora_A", 1)[0] for key, (a, b) in weights.items()
              if not (torch.isfinite(a).all() and torch.isfinite(b).all())]
    if broken:
        raise ValueError(f"adapter {spec.name!r} ({spec.path}): the weights of {broken[:3]} hold NaN or infinite "
                         "values (training diverged?); retrain the adapter or use an earlier checkpoint")
    return AdapterWeights(spec.name, spec.path, weights, spec.scale, spec.rank, spec.target_modules)


def _pattern(patterns: dict | None, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
