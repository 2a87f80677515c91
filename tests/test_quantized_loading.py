"""Quantized checkpoints: official pre-quantized layouts, quantize-while-loading, save/load."""

from __future__ import annotations

import pytest
import torch
from official_layout import random_official_state, tiny_config, tokenizers_dir, write_tiny_checkpoint

import chatglm_ptuning
from chatglm_ptuning import load_model
from chatglm_ptuning.checkpoint import CheckpointError
from chatglm_ptuning.loading import load_model_weights
from chatglm_ptuning.official_format import write_official_folder
from chatglm_ptuning.quantization import QuantizedLinear, is_quantized_linear_name, quantize, quantize_weight
from transformers import AutoModel, AutoModelForCausalLM

IDS = {"chatglm2": torch.tensor([[64790, 64792, 790, 30951, 517, 30910]]), "chatglm": torch.tensor([[5, 74874, 130001, 130004]])}


def _logits(model, arch):
    with torch.no_grad():
        return model(IDS[arch]).logits.float()


def _official_quantized_folder(folder, arch, bits):
    """What THUDM/chatglm2-6b-int4 / chatglm-6b-int4 hold: int8 `weight` [out, in/2 or in] + `weight_scale`,
    config.json with quantization_bit, every other tensor dense fp16."""
    config = tiny_config(arch)
    state = random_official_state(config)
    quantized = {}
    for key, tensor in state.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and is_quantized_linear_name(arch, module):
            # The official scale dtypes: fp16 weights give fp16 scales (fp32 is accepted too).
            qweight, scale = quantize_weight(tensor, bits)
            quantized[key], quantized[module + ".weight_scale"] = qweight, scale
        else:
            quantized[key] = tensor
    config.quantization_bit = bits
    write_official_folder(config, quantized, folder, fmt="bin", num_shards=1)
    tokenizer = "chatglm-6b" if arch == "chatglm" else "chatglm2-6b"
    for item in (tokenizers_dir() / tokenizer).iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    return folder, quantized


@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
def test_official_int4_layout_loads_through_from_pretrained_and_load_model(tmp_path, arch, shared_tokenizers):
    folder, stored = _official_quantized_folder(tmp_path / "int4", arch, 4)
    via_auto = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    via_loader = load_model_weights(folder, device="cpu", dtype=torch.float32)
    for model in (via_auto, via_loader):
        assert model.config.quantization_bit == 4
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == 4 * model.config.num_layers
        state = model.state_dict()
        for key, tensor in stored.items():
            if tensor.dtype == torch.int8:
                assert torch.equal(state[key], tensor), key
    assert torch.allclose(_logits(via_auto, arch), _logits(via_loader, arch), atol=1e-5)


@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_while_loading_equals_load_then_quantize(tmp_path, arch, bits, shared_tokenizers):
    folder = write_tiny_checkpoint(tmp_path / "dense", arch, num_shards=2)  # fp16 weights, as the official files
    streamed = load_model_weights(folder, quantization_bit=bits, device="cpu", dtype=torch.float32)
    # The official order: load the fp16 model, then quantize it (scales from the fp16 weights).
    dense = load_model_weights(folder, device="cpu", dtype=torch.float16)
    quantize(dense, bits)
    assert streamed.state_dict().keys() == dense.state_dict().keys()
    for key, tensor in dense.state_dict().items():
        got = streamed.state_dict()[key]
        assert torch.equal(got, tensor if got.dtype == tensor.dtype else tensor.to(got.dtype)), key


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_saves_in_the_official_layout_and_loads_back(tmp_path, tiny_glm2_dir, bits):
    model, tokenizer = load_model(tiny_glm2_dir, quantization_bit=bits, device="cpu", dtype=torch.float32)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded, _ = load_model(out, device="cpu", dtype=torch.float32)
    assert reloaded.config.quantization_bit == bits
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value"
    saved = reloaded.state_dict()
    assert saved[qkv + ".weight"].dtype == torch.int8
    assert saved[qkv + ".weight"].shape[1] == (32 // 2 if bits == 4 else 32)
    assert torch.equal(_logits(reloaded, "chatglm2"), _logits(model, "chatglm2"))
    auto = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(_logits(auto, "chatglm2"), _logits(model, "chatglm2"), atol=1e-5)


def test_prefix_trains_through_a_quantized_backbone(tiny_glm2_dir):
    model, _ = load_model(tiny_glm2_dir, pre_seq_len=4, quantization_bit=4, device="cpu", dtype=torch.float32)
    model.train()
    ids = IDS["chatglm2"]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {"transformer.prefix_encoder.embedding.weight"}
    assert grads["transformer.prefix_encoder.embedding.weight"].abs().sum() > 0


@pytest.mark.parametrize("bits", [3, 16, "x"])
def test_bad_quantization_bit_is_a_clear_error(tiny_glm2_dir, bits):
    with pytest.raises(ValueError, match="quantization_bit"):
        load_model(tiny_glm2_dir, quantization_bit=bits, device="cpu")


def test_requantizing_a_prequantized_folder_is_refused(tmp_path, shared_tokenizers):
    folder, _ = _official_quantized_folder(tmp_path / "int4", "chatglm2", 4)
    with pytest.raises(CheckpointError, match="already quantized to INT4"):
        load_model(folder, quantization_bit=8, device="cpu")


# --------------------------------------------------------------------------------------
# model.quantize(bits): the official API
# --------------------------------------------------------------------------------------

FOLDERS = {"chatglm2": "tiny_glm2_dir", "chatglm": "tiny_glm1_dir"}


def _original_quantization(weight: torch.Tensor, bits: int, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The originals' QuantizedLinear.__init__, written from their quantization.py: ChatGLM-6B rounds
    the scale to fp16 (`.half()`) before dividing, ChatGLM2/3 keep the weight's dtype; INT4 packs
    column 2j into the high nibble (compress_int4_weight). One documented departure: a quotient that
    rounds past the range (possible only with a bf16 scale: 127.5 / 127 ~ 1 + 2^-8) wraps around to
    -128 in the original's int8 cast; ours is clamped to the range."""
    max_q = (2 ** (bits - 1)) - 1
    scale = weight.abs().max(dim=-1).values / max_q
    if arch == "chatglm":
        scale = scale.half()
    q = torch.round(weight / scale[:, None]).clamp(-max_q, max_q).to(torch.int8)
    if bits == 4:
        as_bytes = q.view(torch.uint8)
        q = ((as_bytes[:, 0::2] << 4) | (as_bytes[:, 1::2] & 0x0F)).view(torch.int8)
    return q, scale


@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
@pytest.mark.parametrize("bits", [4, 8])
def test_official_snippet_half_quantize_chains(request, arch, bits):
    """`AutoModel.from_pretrained(p).half().quantize(bits)`, as every ChatGLM README does."""
    folder = request.getfixturevalue(FOLDERS[arch])
    dense = AutoModel.from_pretrained(folder).half()
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    model = dense.quantize(bits)
    assert model is dense and model.config.quantization_bit == bits
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 4 * model.config.num_layers
    assert layers == {n for n, _ in dense.named_modules() if is_quantized_linear_name(arch, n)}
    for name in layers:
        q, scale = _original_quantization(dense_state[name + ".weight"], bits, arch)
        state = model.state_dict()
        assert torch.equal(state[name + ".weight"], q) and torch.equal(state[name + ".weight_scale"], scale), name
    model.float()  # the quantized model follows later dtype changes: float scales, int8 weights untouched
    assert model.state_dict()[name + ".weight"].dtype == torch.int8
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    logits, dense_logits = _logits(model, arch), _logits(reference, arch)
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)
    assert (logits - dense_logits).abs().max() < (0.5 if bits == 4 else 0.1) * dense_logits.abs().max()


@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
@pytest.mark.parametrize("bits", [4, 8])
def test_scales_and_integers_are_the_originals_from_every_dtype(request, arch, bits):
    """Bit-identical to the original's formulas from an fp32, fp16 and bf16 model; ChatGLM-6B's
    scales are fp16 whatever the model dtype, ChatGLM2/3's follow the weight."""
    folder = request.getfixturevalue(FOLDERS[arch])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        dense_state = {k: v.clone() for k, v in model.state_dict().items()}
        model.quantize(bits)
        state = model.state_dict()
        for key, tensor in state.items():
            if not key.endswith(".weight_scale"):
                continue
            name = key.removesuffix(".weight_scale")
            q, scale = _original_quantization(dense_state[name + ".weight"], bits, arch)
            assert tensor.dtype == (torch.float16 if arch == "chatglm" else dtype)
            assert torch.equal(state[name + ".weight"], q) and torch.equal(tensor, scale), (dtype, name)


@pytest.mark.parametrize("dtype_change", ["half", "bfloat16", "float"])
def test_quantize_before_or_after_a_dtype_change(tiny_glm2_dir, dtype_change):
    before = getattr(AutoModelForCausalLM.from_pretrained(tiny_glm2_dir).quantize(4), dtype_change)()
    after = getattr(AutoModelForCausalLM.from_pretrained(tiny_glm2_dir), dtype_change)().quantize(4)
    for model in (before, after):
        dtype = model.transformer.embedding.word_embeddings.weight.dtype
        assert dtype == {"half": torch.float16, "bfloat16": torch.bfloat16, "float": torch.float32}[dtype_change]
        with torch.no_grad():
            assert torch.isfinite(model(IDS["chatglm2"]).logits.float()).all()
    assert torch.equal(
        before.state_dict()["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"],
        AutoModelForCausalLM.from_pretrained(tiny_glm2_dir).quantize(4).state_dict()[
            "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"
        ],
    )


@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
def test_quantize_keeps_the_prefix_encoder_trainable_in_fp32(request, arch):
    """The official P-tuning recipe: from_pretrained(pre_seq_len=...).half().quantize(4), then train the prefix."""
    folder = request.getfixturevalue(FOLDERS[arch])
    model = AutoModelForCausalLM.from_pretrained(folder, pre_seq_len=4).half().quantize(4)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    model.float().train()  # fp16 CPU kernels are not the point here; the prefix stays fp32 either way
    ids = IDS[arch]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_quantize_refuses_bad_bits_and_a_second_quantization(tiny_glm2_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_glm2_dir)
    for bits in (0, 3, 16, "4"):
        with pytest.raises(ValueError, match="must be 4 or 8"):
            model.quantize(bits)
    model.quantize(8)
    for bits in (8, 4):
        with pytest.raises(ValueError, match=r"already quantized \(INT8\); quantize\(\) runs once"):
            model.quantize(bits)


@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
@pytest.mark.parametrize("bits", [4, 8])
def test_from_pretrained_quantization_bit_on_a_dense_folder_quantizes(request, arch, bits):
    folder = request.getfixturevalue(FOLDERS[arch])
    via_kwarg = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, quantization_bit=bits)
    via_method = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).quantize(bits)
    streamed = load_model_weights(folder, quantization_bit=bits, device="cpu", dtype=torch.float16)
    assert via_kwarg.config.quantization_bit == bits
    for model in (via_method, streamed):
        assert via_kwarg.state_dict().keys() == model.state_dict().keys()
        for key, tensor in model.state_dict().items():
            assert torch.equal(via_kwarg.state_dict()[key], tensor), key
    config = chatglm_ptuning.ChatGLMConfig.from_pretrained(folder, quantization_bit=bits)
    with_config = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float16)
    assert torch.equal(_logits(with_config, arch), _logits(via_kwarg, arch))


def test_from_pretrained_other_bits_on_a_quantized_folder_is_refused(tmp_path, shared_tokenizers):
    folder, _ = _official_quantized_folder(tmp_path / "int4", "chatglm2", 4)
    with pytest.raises(CheckpointError, match="already quantized to INT4; it cannot be loaded as INT8"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_bit=8)
