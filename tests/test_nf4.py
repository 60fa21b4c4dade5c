"""NF4: byte equality with bitsandbytes (the oracle), the references, nf4_linear, NF4Linear, opcheck."""
import copy
import dataclasses
import itertools
import math

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FLOAT_DTYPES, assert_close
from lorax_core.ops import nf4_linear
from lorax_core.ops import reference as ref
from lorax_core.quant import NF4Linear, NF4Weight

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# bitsandbytes' AVX-512 CPU kernel turns the fp32 product into fp16 with its own rounding (off by one ulp from
# round-to-nearest-even on some values); its AVX2 and scalar paths, and ours, round to nearest even.
BNB_FP16_ROUNDS_ITS_OWN_WAY = torch.backends.cpu.get_cpu_capability() == "AVX512"
SHAPES = [(64, 64), (33, 17), (1, 1), (7,), (300, 129), (1024, 96)]


def bnb_quantize(x, blocksize, double_quant):
    return bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit of the flat tensor, reshaped. On a CPU with AVX512 its kernel (0.50) takes the
    shape's rows as if blocks never crossed them: a block that spans two rows (a row length that is not a multiple
    of the blocksize) comes out scaled by the wrong absmax. One row of every value has no such block."""
    flat = copy.copy(state)
    flat.shape = torch.Size([math.prod(state.shape)])
    return bnbf.dequantize_4bit(packed, flat).reshape(state.shape)


def assert_same_as_bnb(w: NF4Weight, packed, state):
    assert torch.equal(w.codes, packed.reshape(-1))
    if state.nested:
        assert torch.equal(w.absmax, state.absmax)
        assert torch.equal(w.nested_absmax, state.state2.absmax)
        assert torch.equal(w.nested_code, state.state2.code)
        assert w.offset == state.offset.item()
    else:
        assert torch.equal(w.absmax, state.absmax)
    expected = bnb_dequantize(packed, state)
    if BNB_FP16_ROUNDS_ITS_OWN_WAY and expected.dtype == torch.float16:
        torch.testing.assert_close(w.dequantize(), expected, rtol=2**-10, atol=0)
    else:
        assert torch.equal(w.dequantize(), expected)


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(ref.dynamic_map(), bnbf.create_dynamic_map())
    assert torch.equal(ref.NF4_VALUES, bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_equals_bitsandbytes(dtype, blocksize, double_quant):
    for shape in SHAPES:
        x = (torch.randn(shape) * 3).to(dtype)
        packed, state = bnb_quantize(x, blocksize, double_quant)
        w = NF4Weight.quantize(x, blocksize, double_quant)
        assert_same_as_bnb(w, packed, state)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 200),
    cols=st.integers(1, 300),
    blocksize=st.sampled_from(BLOCKSIZES),
    scale=st.floats(1e-4, 1e4),
    zero_rows=st.booleans(),
)
def test_quantize_equals_bitsandbytes_random_shapes(rows, cols, blocksize, scale, zero_rows):
    x = torch.randn(rows, cols) * scale
    if zero_rows:
        x[::3] = 0  # all-zero blocks take the clamped-absmax path
    packed, state = bnb_quantize(x, blocksize, True)
    assert_same_as_bnb(NF4Weight.quantize(x, blocksize, True), packed, state)


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_ops_equal_reference(blocksize):
    x = torch.randn(123, 77) * 2
    codes, absmax = torch.ops.lorax_core.nf4_quantize(x, blocksize)
    ref_codes, ref_absmax = ref.nf4_quantize(x, blocksize)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)

    centred = absmax - absmax.mean()
    code2 = ref.dynamic_map()
    q, absmax2 = torch.ops.lorax_core.nf4_quantize_absmax(centred, code2, 256)
    ref_q, ref_absmax2 = ref.nf4_quantize_absmax(centred, code2, 256)
    assert torch.equal(q, ref_q) and torch.equal(absmax2, ref_absmax2)

    offset = float(absmax.mean())
    deq_absmax = torch.ops.lorax_core.nf4_dequantize_absmax(q, code2, absmax2, offset, 256)
    assert torch.equal(deq_absmax, ref.nf4_dequantize_absmax(q, code2, absmax2, offset, 256))

    for dtype in FLOAT_DTYPES:
        out = torch.ops.lorax_core.nf4_dequantize(codes, absmax, None, None, 0.0, blocksize, 256, [123, 77], dtype)
        assert torch.equal(out, ref.nf4_dequantize(codes, absmax, blocksize, (123, 77), dtype))


def test_bnb_round_trip_is_exact():
    x = torch.randn(96, 160, dtype=torch.bfloat16)
    packed, state = bnb_quantize(x, 64, True)
    w = NF4Weight.from_bnb(packed, state)
    assert_same_as_bnb(w, packed, state)
    packed2, state2 = w.to_bnb()
    assert torch.equal(packed2, packed)
    assert torch.equal(bnb_dequantize(packed2, state2), bnb_dequantize(packed, state))


def test_load_transformers_4bit_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_helpers import bnb_config, bnb_in_fp32

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config(), device_map="cpu")
    bnb_in_fp32(model)
    model.save_pretrained(tmp_path / "nf4")
    state_dict = load_file(tmp_path / "nf4" / "model.safetensors")

    for name in ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]:
        prefix = f"model.layers.0.{name}."
        w = NF4Weight.from_state_dict(state_dict, prefix)
        module = model.get_submodule(f"model.layers.0.{name}")
        assert w.shape == module.weight.quant_state.shape
        expected = bnb_dequantize(module.weight.data, module.weight.quant_state)
        assert torch.equal(w.dequantize(), expected)
        x = torch.randn(3, w.shape[1])
        assert_close(nf4_linear(x, w), module(x))

    with pytest.raises(ValueError, match="not a bitsandbytes NF4 weight"):
        NF4Weight.from_state_dict(state_dict, "model.embed_tokens.")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3), ()])
@pytest.mark.parametrize("bias", [False, True])
def test_nf4_linear_matches_reference(dtype, lead, bias):
    w = NF4Weight.quantize(torch.randn(48, 256), 64, True)
    x = torch.randn(*lead, 256).to(dtype)
    b = torch.randn(48).to(dtype) if bias else None
    y = nf4_linear(x, w, b)
    assert y.shape == (*lead, 48) and y.dtype == dtype
    expected = ref.nf4_linear(x, w.dequantize(torch.float32), b)
    assert_close(y, expected, scale=16)


def test_nf4_linear_module_is_a_drop_in():
    linear = torch.nn.Linear(128, 40)
    q = NF4Linear.from_linear(linear, blocksize=64)
    x = torch.randn(4, 7, 128)
    deq = torch.nn.Linear(128, 40)
    deq.weight.data = q.weight.dequantize(torch.float32)
    deq.bias.data = linear.bias.data.clone()
    assert_close(q(x), deq(x))
    assert "blocksize=64" in repr(q)
    # quantization error stays small relative to the weights (NF4: about 10% of the block absmax)
    assert (q.weight.dequantize(torch.float32) - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()


def test_nf4_linear_gradient_flows_to_input():
    w = NF4Weight.quantize(torch.randn(32, 64), 64, True)
    x = torch.randn(3, 64, requires_grad=True)
    nf4_linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.dequantize(torch.float32).sum(0).expand(3, 64))


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="blocksize"):
        NF4Weight.quantize(torch.randn(8, 8), blocksize=48)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        NF4Weight.quantize(torch.randint(0, 3, (8, 8)))
    w = NF4Weight.quantize(torch.randn(16, 64))
    with pytest.raises(ValueError, match="x has 32 features, the weight expects 64"):
        nf4_linear(torch.randn(2, 32), w)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        torch.ops.lorax_core.nf4_quantize(torch.randn(8), 48)
    with pytest.raises(RuntimeError, match="codes hold 1022 values, the shape asks for 1024"):
        torch.ops.lorax_core.nf4_dequantize(w.codes[:-1], w.absmax, w.nested_code, w.nested_absmax, w.offset, 64,
                                            256, [16, 64], torch.float32)
    with pytest.raises(RuntimeError, match="code must be 256 float32 values"):
        torch.ops.lorax_core.nf4_quantize_absmax(torch.randn(8), torch.randn(5), 256)
    nf4_linear(torch.randn(2, 64), w)  # the ops still work after refusing bad input


def fused_parts(rows=(64, 64, 32), k=256, device="cpu", double_quant=True) -> list[NF4Weight]:
    """The parts of a fused projection (q | k | v by default), each quantized alone, as bitsandbytes quantizes each
    Linear: each has its own offset (their weights' scales differ, so do their offsets)."""
    gen = torch.Generator().manual_seed(sum(rows))
    return [NF4Weight.quantize((torch.randn(r, k, generator=gen) * (1 + i)).to(device), 64, double_quant)
            for i, r in enumerate(rows)]


@pytest.mark.parametrize("rows", [(64, 64, 32), (64, 80), (128, 64, 64)], ids=str)
def test_cat_keeps_each_parts_double_quantization(rows):
    """NF4Weight.cat of double-quantized parts whose blocks fill nested blocks keeps their 8-bit absmax, each part
    with its own offset: every absmax value, dequantized weight and nf4_linear output equals the parts' (and the
    fp32-absmax fusion's), with a byte an absmax value instead of four."""
    parts = fused_parts(rows)
    fused = NF4Weight.cat(parts)
    fp32 = NF4Weight.cat(parts, keep_double_quant=False)
    assert fused.double_quant and fused.absmax.dtype == torch.uint8 and not fp32.double_quant
    starts = list(itertools.accumulate(p.absmax.numel() for p in parts))[:-1]
    assert fused.part_starts == tuple(starts) and fused.part_offsets == tuple(p.offset for p in parts[1:])
    assert len({fused.offset, *fused.part_offsets}) == len(parts)  # one offset for all would be wrong
    expected = torch.cat([p.absmax_fp32() for p in parts])
    assert torch.equal(fused.absmax_fp32(), expected) and torch.equal(fp32.absmax, expected)
    assert torch.equal(ref.nf4_dequantize_absmax(fused.absmax, fused.nested_code, fused.nested_absmax, fused.offset,
                                                 256, fused.part_starts, fused.part_offsets), expected)
    for dtype in FLOAT_DTYPES:
        assert torch.equal(fused.dequantize(dtype), torch.cat([p.dequantize(dtype) for p in parts]))
    x = torch.randn(3, 256)
    assert torch.equal(nf4_linear(x, fused), nf4_linear(x, fp32))


def test_cat_falls_back_to_fp32_absmax():
    """Where the parts' double quantization cannot be kept, cat stores the absmax in fp32 (and still computes what
    the parts do): a part ending inside a nested block (16 rows: 64 blocks), a part without double quantization,
    more parts than kMaxAbsmaxParts, or when asked to."""
    cases = [(fused_parts((16, 64)), {}), (fused_parts((64,)) + fused_parts((64,), double_quant=False), {}),
             (fused_parts((64, 64, 64, 64)), {}), (fused_parts((64, 64)), {"keep_double_quant": False})]
    for parts, kwargs in cases:
        fused = NF4Weight.cat(parts, **kwargs)
        assert not fused.double_quant and fused.absmax.dtype == torch.float32 and not fused.part_starts
        assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_bad_parts_get_clear_errors():
    fused = NF4Weight.cat(fused_parts())  # 256, 256 and 128 blocks
    nested = (fused.absmax, fused.nested_code, fused.nested_absmax, fused.offset, 256)
    dequantize_absmax = torch.ops.lorax_core.nf4_dequantize_absmax
    with pytest.raises(RuntimeError, match=r"part_starts must increase, lie inside the 640 absmax blocks and each "
                                           r"start a nested block of 256; got \[100\]"):
        dequantize_absmax(*nested, [100], [0.5])
    with pytest.raises(RuntimeError, match="part_starts must increase"):
        dequantize_absmax(*nested, [512, 256], [0.5, 0.25])
    with pytest.raises(RuntimeError, match="part_starts and part_offsets differ in length"):
        dequantize_absmax(*nested, [256], [])
    with pytest.raises(RuntimeError, match="at most 3 parts"):
        dequantize_absmax(*nested, [256, 512, 768], [0.5, 0.25, 0.125])
    plain = NF4Weight.quantize(torch.randn(64, 256), 64, False)
    with pytest.raises(RuntimeError, match="this absmax has no nested_code"):
        torch.ops.lorax_core.nf4_dequantize(plain.codes, plain.absmax, None, None, 0.0, 64, 256, [64, 256],
                                            torch.float32, [256], [0.5])
    with pytest.raises(ValueError, match=r"part_starts \(100, 512\)"):
        dataclasses.replace(fused, part_starts=(100, 512))
    with pytest.raises(ValueError, match="one bitsandbytes QuantState cannot hold"):
        fused.to_bnb()
    assert torch.equal(dequantize_absmax(*nested, list(fused.part_starts), list(fused.part_offsets)),
                       fused.absmax_fp32())  # the op still works after refusing bad input


def _opcheck_samples(device):
    w = NF4Weight.quantize(torch.randn(32, 128, device=device), 64, True)
    plain = NF4Weight.quantize(torch.randn(32, 128, device=device), 128, False)
    x = torch.randn(3, 128, device=device)
    samples = [
        ("nf4_quantize", (torch.randn(10, 70, device=device), 64)),
        ("nf4_quantize_absmax", (torch.randn(700, device=device), ref.dynamic_map().to(device), 256)),
        ("nf4_dequantize_absmax", (w.absmax, w.nested_code, w.nested_absmax, w.offset, 256)),
    ]
    for v in (w, plain):
        state = (v.codes, v.absmax, v.nested_code, v.nested_absmax, v.offset, v.blocksize, v.nested_blocksize)
        samples.append(("nf4_dequantize", (*state, [32, 128], torch.float32)))
        samples.append(("nf4_linear", (x, *state, 32, None)))
        samples.append(("nf4_linear", (x.requires_grad_(), *state, 32, torch.randn(32, device=device))))
    f = NF4Weight.cat(fused_parts((128, 128, 64), k=128, device=device))  # parts with their own offsets
    state = (f.codes, f.absmax, f.nested_code, f.nested_absmax, f.offset, 64, 256)
    parts = (f.part_starts, f.part_offsets)
    samples += [("nf4_dequantize_absmax", (f.absmax, f.nested_code, f.nested_absmax, f.offset, 256, *parts)),
                ("nf4_dequantize", (*state, [320, 128], torch.float32, *parts)),
                ("nf4_linear", (x.requires_grad_(), *state, 320, torch.randn(320, device=device), *parts))]
    return samples


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.lorax_core, op).default, args)
