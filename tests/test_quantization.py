"""Weight-only INT8/INT4 quantization: official formulas and byte layout, kernels, gradients, surgery."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from chatglm_ptuning import quantization
from chatglm_ptuning.configuration import ARCH_GLM1, ARCH_GLM2
from chatglm_ptuning.quantization import (
    QuantizedLinear,
    dequantize_weight,
    is_quantized_linear_name,
    pack_int4,
    quantize,
    quantize_linear_state,
    quantize_weight,
    unpack_int4,
    unpacked_weight,
)

BITS = (4, 8)


def _i8(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int8)


# --------------------------------------------------------------------------------------
# Formulas and byte layout, against hand-worked examples
# --------------------------------------------------------------------------------------


def test_pack_int4_puts_even_column_in_high_nibble():
    q = _i8([[2, -7, 0, -2], [-7, 7, -1, 0]])
    # (2<<4)|(-7&0xF) = 0x29 = 41; (0<<4)|(-2&0xF) = 0x0E = 14;
    # (-7&0xF)<<4 | 7 = 0x97 = -105 as int8; (-1&0xF)<<4 | 0 = 0xF0 = -16 as int8.
    assert pack_int4(q).tolist() == [[41, 14], [-105, -16]]


def test_unpack_int4_sign_extends_both_nibbles():
    packed = _i8([[-128, 127, 8, -1]])  # 0x80, 0x7F, 0x08, 0xFF
    assert unpack_int4(packed).tolist() == [[-8, 0, 7, -1, 0, -8, -1, -1]]


def test_pack_unpack_round_trip_every_byte_and_odd_row_counts():
    every_byte = torch.arange(-128, 128, dtype=torch.int8).reshape(16, 16)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    generator = torch.Generator().manual_seed(0)
    for rows, cols in [(1, 2), (3, 6), (7, 10), (5, 34)]:
        q = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=generator)
        packed = pack_int4(q)
        assert packed.shape == (rows, cols // 2)
        assert torch.equal(unpack_int4(packed), q)


def test_quantize_weight_int8_hand_example_rounds_half_to_even():
    weight = torch.tensor([[31.75, 0.375, -0.125, 0.625], [254.0, -127.0, 1.0, 0.5]])
    qweight, scale = quantize_weight(weight, 8)
    # Row 0: scale 31.75/127 = 0.25; 1.5 -> 2, -0.5 -> -0, 2.5 -> 2. Row 1: scale 2; -63.5 -> -64, 0.5 -> 0.
    assert scale.tolist() == [0.25, 2.0]
    assert qweight.dtype == torch.int8
    assert qweight.tolist() == [[127, 2, 0, 2], [127, -64, 0, 0]]


def test_quantize_weight_int4_hand_example():
    weight = torch.tensor([[2.5, -7.0, 0.5, -1.5], [-14.0, 14.0, -3.0, 1.0]])
    qweight, scale = quantize_weight(weight, 4)
    # Row 0: scale 1, q = [2, -7, 0, -2] -> bytes 0x29, 0x0E. Row 1: scale 2, q = [-7, 7, -2, 0] -> 0x97, 0xE0.
    assert scale.tolist() == [1.0, 2.0]
    assert qweight.tolist() == [[41, 14], [-105, -32]]
    assert unpacked_weight(qweight, 4).tolist() == [[2, -7, 0, -2], [-7, 7, -2, 0]]


def test_scale_dtype_follows_the_family_rule():
    weight = torch.tensor([[1.0, 2.5 / 127, 0.5 / 127, 1.5 / 127]])
    q_glm2, s_glm2 = quantize_weight(weight, 8)  # fp32 scale 1/127: exact halves round to even
    q_glm1, s_glm1 = quantize_weight(weight, 8, torch.float16)  # fp16 scale is slightly smaller
    assert s_glm2.dtype == torch.float32 and s_glm1.dtype == torch.float16
    assert q_glm2.tolist() == [[127, 2, 0, 2]]
    assert q_glm1.tolist() == [[127, 3, 1, 2]]
    # The streaming helper applies each family's rule by itself.
    name = "transformer.layers.0.attention.dense.weight"
    assert quantize_linear_state(ARCH_GLM1, name, weight, 8)[name].tolist() == [[127, 3, 1, 2]]
    name2 = "transformer.encoder.layers.0.self_attention.dense.weight"
    state = quantize_linear_state(ARCH_GLM2, name2, weight.half(), 8)
    assert state[name2[: -len("weight")] + "weight_scale"].dtype == torch.float16


def test_zero_rows_quantize_to_zero_without_nan():
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -0.5, 0.25, 0.0]])
    for bits in BITS:
        qweight, scale = quantize_weight(weight, bits)
        assert scale[0] == 0
        dense = dequantize_weight(qweight, scale, bits)
        assert not dense.isnan().any()
        assert dense[0].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_dequantize_is_scale_times_integer_weight():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(9, 12, generator=generator)
    for bits in BITS:
        qweight, scale = quantize_weight(weight, bits)
        expected = unpacked_weight(qweight, bits).float() * scale[:, None]
        assert torch.equal(dequantize_weight(qweight, scale, bits, torch.float32), expected)
        max_q = 2 ** (bits - 1) - 1
        assert (dequantize_weight(qweight, scale, bits) - weight).abs().max() <= scale.max() / 2 + 1e-6
        assert unpacked_weight(qweight, bits).abs().max() == max_q


@pytest.mark.parametrize("bits", [3, 16, 0, "x", 4.0, True])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(ValueError, match="4 or 8"):
        quantize_weight(torch.ones(2, 4), bits)
    with pytest.raises(ValueError, match="4 or 8"):
        QuantizedLinear(4, 2, bits)
    with pytest.raises(ValueError, match="4 or 8"):
        quantize(_tiny_model(ARCH_GLM2), bits)


def test_odd_input_features_are_rejected_for_int4():
    with pytest.raises(ValueError, match="even number of input"):
        quantize_weight(torch.ones(2, 5), 4)
    with pytest.raises(ValueError, match="even number of input"):
        QuantizedLinear(5, 2, 4)
    with pytest.raises(ValueError, match="even number of input"):
        pack_int4(torch.zeros(2, 5, dtype=torch.int8))
    qweight, _ = quantize_weight(torch.ones(2, 5), 8)  # INT8 has no such constraint
    assert qweight.shape == (2, 5)


def test_holders_have_the_official_6b_shapes():
    # Shapes of chatglm2-6b-int4 (its pytorch_model.bin), built on the meta device.
    for in_f, out_f, packed in [(4096, 4608, 2048), (4096, 4096, 2048), (4096, 27392, 2048), (13696, 4096, 6848)]:
        layer = QuantizedLinear(in_f, out_f, 4, bias=False, device="meta", dtype=torch.float16)
        assert layer.weight.shape == (out_f, packed) and layer.weight.dtype == torch.int8
        assert layer.weight_scale.shape == (out_f,)
    assert QuantizedLinear(16384, 4096, 8, device="meta").weight.shape == (4096, 16384)


# --------------------------------------------------------------------------------------
# QuantizedLinear: forward kernels and gradients
# --------------------------------------------------------------------------------------


def _layer(bits: int, in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    return QuantizedLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), bits)


def _dense_reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.dequantized_weight(torch.float32), bias)


# in_features 64 reaches the bf16 int8pack kernel on CPU; 30 does not; 600 outputs span 3 weight blocks.
SHAPES = [(64, 48), (64, 600), (30, 20)]


@pytest.fixture(params=[False, True], ids=["emulated-bf16", "native-bf16"])
def cpu_bf16(request, monkeypatch):
    """Run the test under both CPU kernel choices, whatever this machine has."""
    monkeypatch.setattr(quantization, "_cpu_has_native_bf16", lambda: request.param)
    return request.param


@pytest.mark.parametrize("bits", BITS)
def test_cpu_kernel_choice(bits, cpu_bf16, monkeypatch):
    calls = []
    int8pack = torch._weight_int8pack_mm

    def spy(*args):
        calls.append(args[0].shape[0])
        return int8pack(*args)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", spy)
    wide, narrow = _layer(bits, 64, 300), _layer(bits, 30, 300)
    for layer, rows, dtype, expected in [
        (wide, 8, torch.bfloat16, True),
        (wide, 32, torch.bfloat16, not cpu_bf16),  # native bf16 matmuls win from 9 rows on
        (wide, 33, torch.bfloat16, False),
        (wide, 8, torch.float32, False),  # the fp32 int8pack kernel is 10-150x slower
        (narrow, 8, torch.bfloat16, False),  # in_features must be a multiple of 64
    ]:
        calls.clear()
        with torch.no_grad():
            layer(torch.randn(rows, layer.in_features).to(dtype))
        assert bool(calls) == expected, (layer.in_features, rows, dtype)
        assert all(n == rows for n in calls) and len(calls) in (0, 2)  # 300 outputs: two weight blocks


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_forward_fp32_matches_dense_dequantized(bits, in_features, out_features, rows):
    layer = _layer(bits, in_features, out_features)
    x = torch.randn(2, rows, in_features)
    out = layer(x)
    assert out.shape == (2, rows, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out, _dense_reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_forward_half_precision_matches_dense_dequantized(bits, dtype, in_features, out_features, rows, cpu_bf16):
    layer = _layer(bits, in_features, out_features)
    x = torch.randn(3, rows, in_features).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    reference = _dense_reference(layer, x)
    # The output is rounded to the half dtype (then the bias is added in it): a few ulps.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(out.float(), reference, rtol=2 * ulp, atol=2 * ulp * reference.abs().max().item())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_grad_to_input_matches_dense_dequantized_weight(bits, dtype, in_features, out_features, cpu_bf16):
    layer = _layer(bits, in_features, out_features)
    x = torch.randn(2, 5, in_features).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 5, out_features)
    layer(x).backward(grad_out.to(dtype))

    x_ref = x.detach().float().requires_grad_()
    _dense_reference(layer, x_ref).backward(grad_out.to(dtype).float())
    assert x.grad.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=tol, atol=tol * x_ref.grad.abs().max().item())
    assert layer.weight.grad is None and layer.weight_scale.grad is None
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("bits", BITS)
def test_no_dense_weight_is_saved_for_backward(bits):
    layer = _layer(bits, 64, 96)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).sum().backward()
    assert (torch.int8, tuple(layer.weight.shape)) in saved
    assert all(not (dtype.is_floating_point and shape == (96, 64)) for dtype, shape in saved)


@pytest.mark.parametrize("bits", BITS)
def test_gradient_through_non_reentrant_checkpoint(bits):
    first, second = _layer(bits, 64, 64, seed=1), _layer(bits, 64, 64, seed=2)

    def block(h):
        return second(torch.tanh(first(h)))

    x = torch.randn(3, 64, requires_grad=True)
    block(x).square().sum().backward()
    expected = x.grad.clone()
    x.grad = None
    checkpoint(block, x, use_reentrant=False).square().sum().backward()
    torch.testing.assert_close(x.grad, expected)


def test_state_dict_names_dtypes_and_loading_fp32_scales():
    layer = _layer(4, 64, 32)
    state = layer.state_dict()
    assert set(state) == {"weight", "weight_scale", "bias"}
    assert state["weight"].dtype == torch.int8 and state["weight"].shape == (32, 32)

    holder = QuantizedLinear(64, 32, 4, dtype=torch.float16)
    holder.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    assert holder.weight_scale.dtype == torch.float16
    assert torch.equal(holder.weight, layer.weight)

    layer.to(torch.bfloat16)  # dtype casts leave the integer weight alone
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.bfloat16
    x = torch.randn(2, 64)
    assert layer(x).dtype == torch.float32  # the scale follows the activation dtype


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(ValueError, match=r"inputs \[\.\.\., 64\]"):
        _layer(8, 64, 32)(torch.randn(2, 63))


# --------------------------------------------------------------------------------------
# Model surgery on stand-in module trees with the official names
# --------------------------------------------------------------------------------------


def _block(attention_name: str, hidden: int, qkv: int, h_to_4h: int, four_h: int, bias: bool) -> nn.Module:
    attention, mlp, block = nn.Module(), nn.Module(), nn.Module()
    attention.query_key_value = nn.Linear(hidden, qkv, bias=True)
    attention.dense = nn.Linear(hidden, hidden, bias=bias)
    mlp.dense_h_to_4h = nn.Linear(hidden, h_to_4h, bias=bias)
    mlp.dense_4h_to_h = nn.Linear(four_h, hidden, bias=bias)
    setattr(block, attention_name, attention)
    block.mlp = mlp
    return block


def _tiny_model(architecture: str, layers: int = 2, hidden: int = 32) -> nn.Module:
    """A module tree with each family's official names and biases (not the real model classes)."""
    torch.manual_seed(0)
    model, transformer = nn.Module(), nn.Module()
    model.config = SimpleNamespace(architecture=architecture, quantization_bit=0)
    model.transformer = transformer
    if architecture == ARCH_GLM1:  # every linear has a bias; plain 4h MLP
        blocks = [_block("attention", hidden, 3 * hidden, 4 * hidden, 4 * hidden, True) for _ in range(layers)]
        transformer.layers = nn.ModuleList(blocks)
        transformer.word_embeddings = nn.Embedding(10, hidden)
        model.lm_head = nn.Linear(hidden, 10, bias=False)
    else:  # only qkv has a bias; SwiGLU MLP (h_to_4h is twice the 4h width)
        blocks = [_block("self_attention", hidden, 2 * hidden, 6 * hidden, 3 * hidden, False) for _ in range(layers)]
        transformer.encoder = nn.Module()
        transformer.encoder.layers = nn.ModuleList(blocks)
        transformer.output_layer = nn.Linear(hidden, 10, bias=False)
    return model


@pytest.mark.parametrize("architecture", [ARCH_GLM1, ARCH_GLM2])
@pytest.mark.parametrize("bits", BITS)
def test_quantize_replaces_exactly_the_table_linears(architecture, bits):
    model = _tiny_model(architecture)
    dense_names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert quantize(model, bits) is model
    quantized = {name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    assert len(quantized) == 8
    assert all(is_quantized_linear_name(architecture, name) for name in quantized)
    still_dense = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert still_dense == dense_names - quantized and len(still_dense) == 1  # lm_head / output_layer
    assert model.config.quantization_bit == bits
    scale_dtype = torch.float16 if architecture == ARCH_GLM1 else torch.float32
    assert all(model.get_submodule(name).weight_scale.dtype == scale_dtype for name in quantized)
    # The inner model's names (no "transformer.") are recognised too.
    assert is_quantized_linear_name(architecture, next(iter(quantized)).removeprefix("transformer."))


def test_quantize_twice_returns_early_or_raises_for_other_bits():
    model = quantize(_tiny_model(ARCH_GLM2), 4)
    weights = {name: p.clone() for name, p in model.named_parameters()}
    assert quantize(model, 4) is model
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="already quantized to INT4"):
        quantize(model, 8)


def test_quantize_without_matching_linears_is_a_clear_error():
    model = _tiny_model(ARCH_GLM2)
    model.config.architecture = ARCH_GLM1  # GLM1 names are absent from a GLM2 tree
    with pytest.raises(ValueError, match="no quantizable linear"):
        quantize(model, 8)


@pytest.mark.parametrize("architecture", [ARCH_GLM1, ARCH_GLM2])
@pytest.mark.parametrize("bits", BITS)
def test_empty_init_holders_load_a_quantized_state_dict(architecture, bits):
    source = quantize(_tiny_model(architecture), bits)
    target = quantize(_tiny_model(architecture), bits, empty_init=True)
    assert {k: (v.shape, v.dtype) for k, v in target.state_dict().items() if "weight_scale" not in k} == {
        k: (v.shape, v.dtype) for k, v in source.state_dict().items() if "weight_scale" not in k
    }
    target.load_state_dict(source.state_dict())
    for name, module in source.named_modules():
        if isinstance(module, QuantizedLinear):
            x = torch.randn(2, module.in_features)
            torch.testing.assert_close(target.get_submodule(name)(x), module(x))


def test_streaming_helper_matches_module_quantization():
    for architecture in (ARCH_GLM1, ARCH_GLM2):
        dense = _tiny_model(architecture)
        dense_state = dense.state_dict()
        quantized_state = quantize(_tiny_model(architecture), 4).state_dict()
        streamed = {}
        for key, tensor in dense_state.items():
            entries = quantize_linear_state(architecture, key, tensor, 4)
            streamed.update(entries if entries is not None else {key: tensor})
        assert streamed.keys() == quantized_state.keys()
        assert all(torch.equal(streamed[k], quantized_state[k]) for k in streamed)


def test_name_table():
    assert is_quantized_linear_name(ARCH_GLM1, "transformer.layers.27.mlp.dense_4h_to_h")
    assert is_quantized_linear_name(ARCH_GLM1, "layers.0.attention.query_key_value")
    assert not is_quantized_linear_name(ARCH_GLM1, "lm_head")
    assert not is_quantized_linear_name(ARCH_GLM1, "transformer.layers.0.attention.dense.weight")
    assert not is_quantized_linear_name(ARCH_GLM1, "transformer.encoder.layers.0.self_attention.dense")
    assert is_quantized_linear_name(ARCH_GLM2, "transformer.encoder.layers.3.self_attention.dense")
    assert not is_quantized_linear_name(ARCH_GLM2, "transformer.output_layer")
    assert not is_quantized_linear_name(ARCH_GLM2, "transformer.prefix_encoder.trans.0")
    bias = "transformer.encoder.layers.0.self_attention.query_key_value.bias"
    assert quantize_linear_state(ARCH_GLM2, bias, torch.ones(4), 4) is None
    with pytest.raises(ValueError, match="unknown ChatGLM architecture"):
        is_quantized_linear_name("glm4", "layers.0.attention.dense")


# --------------------------------------------------------------------------------------
# The real models
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_models():
    """build(architecture) -> a tiny fp32 LM with a prefix and random official-scale weights, eval mode."""
    from official_layout import random_official_state, random_prefix_state, tiny_config

    from chatglm_ptuning import ChatGLM2ForConditionalGeneration, ChatGLMForConditionalGeneration

    def build(architecture: str):
        # hidden 64 makes most linears eligible for the bf16 int8pack kernel; the rest take the fp32 path.
        config = tiny_config(architecture, pre_seq_len=4, hidden_size=64)
        model_class = ChatGLMForConditionalGeneration if architecture == ARCH_GLM1 else ChatGLM2ForConditionalGeneration
        model = model_class(config)
        state = {k: v.float() for k, v in random_official_state(config).items()}
        state.update(random_prefix_state(config))
        model.load_state_dict(state, strict=False)
        if architecture == ARCH_GLM1:
            ids = [5, 6, 7, 8, config.gmask_token_id, config.bos_token_id, 9, 10]
        else:
            ids = [64790, 64792, 30910, 5, 6, 7, 8, 9]
        return model.eval(), torch.tensor([ids, ids[:2] + ids[3:] + [11]])

    return build


def _quantized_and_dequantized(model: nn.Module, bits: int) -> tuple[nn.Module, nn.Module]:
    """(model quantized, a dense copy whose linears hold exactly the dequantized weights)."""
    import copy

    quantized = quantize(copy.deepcopy(model), bits)
    dequantized = copy.deepcopy(model)
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            dequantized.get_submodule(name).weight.data.copy_(module.dequantized_weight(torch.float32))
    return quantized, dequantized


@pytest.mark.parametrize("architecture", [ARCH_GLM1, ARCH_GLM2])
def test_real_model_logits_close_to_dense(real_models, architecture):
    model, ids = real_models(architecture)
    with torch.no_grad():
        dense = model(ids).logits
    errors = {}
    for bits in BITS:
        quantized, dequantized = _quantized_and_dequantized(model, bits)
        assert quantized.config.quantization_bit == bits
        assert sum(isinstance(m, QuantizedLinear) for m in quantized.modules()) == 4 * quantized.config.num_layers
        with torch.no_grad():
            logits = quantized(ids).logits
            torch.testing.assert_close(logits, dequantized(ids).logits, rtol=1e-5, atol=1e-5)
            half = quantized.to(torch.bfloat16)(ids).logits.float()
            half_reference = dequantized.to(torch.bfloat16)(ids).logits.float()
        torch.testing.assert_close(half, half_reference, rtol=0.02, atol=0.02 * half_reference.abs().max().item())
        errors[bits] = ((logits - dense).abs().max() / dense.abs().max()).item()
    # Quantization noise of random weights: small for INT8, larger for INT4.
    assert errors[8] < 0.03 and errors[4] < 0.5 and errors[8] < errors[4]


@pytest.mark.parametrize("architecture", [ARCH_GLM1, ARCH_GLM2])
@pytest.mark.parametrize("bits", BITS)
def test_real_model_prefix_grads_match_dequantized_dense(real_models, architecture, bits):
    model, ids = real_models(architecture)
    labels = ids.clone()
    labels[:, :4] = -100

    def prefix_grads(lm: nn.Module) -> dict[str, torch.Tensor]:
        lm.train().zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same prefix-dropout draw in every run
        lm(ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}

    quantized, dequantized = _quantized_and_dequantized(model, bits)
    expected = prefix_grads(dequantized)
    assert list(expected) == ["transformer.prefix_encoder.embedding.weight"]
    assert expected["transformer.prefix_encoder.embedding.weight"].abs().sum() > 0
    plain = prefix_grads(quantized)
    quantized.activation_checkpointing_enable({"use_reentrant": False})
    assert any(getattr(module, "gradient_checkpointing", False) for module in quantized.modules())
    checkpointed = prefix_grads(quantized)
    for grads in (plain, checkpointed):
        assert grads.keys() == expected.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bench_quick_runs_and_writes_json(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_quant.py"
    output = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--output", str(output)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert "| K | N | M | mode | variant |" in run.stdout
    rows = json.loads(output.read_text())["linear"]
    assert {r["variant"] for r in rows} == {
        "dense fp32",
        "dense fp32, column blocks",
        "dense bf16",
        "int8 fp32",
        "int8 bf16",
        "int4 fp32",
        "int4 bf16",
    }
    assert all(r["ms"] > 0 and r["vs_dense_fp32"] > 0 for r in rows)
    assert all(r["vs_dense_fp32"] == 1.0 for r in rows if r["variant"] == "dense fp32")
    int4 = next(r for r in rows if r["variant"] == "int4 fp32")
    assert int4["weight_bytes"] == int4["N"] * int4["K"] // 2 + int4["N"] * 4  # packed weight + fp32 scale
