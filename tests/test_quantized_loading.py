"""Quantized checkpoints: official pre-quantized layouts, quantize-while-loading, save/load."""

from __future__ import annotations

import pytest
import torch
from official_layout import random_official_state, tiny_config, tokenizers_dir, write_tiny_checkpoint

import chatglm_ptuning  # noqa: F401
from chatglm_ptuning import load_model
from chatglm_ptuning.checkpoint import CheckpointError
from chatglm_ptuning.loading import load_model_weights
from chatglm_ptuning.official_format import write_official_folder
from chatglm_ptuning.quantization import QuantizedLinear, is_quantized_linear_name, quantize, quantize_weight
from transformers import AutoModelForCausalLM

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
            # The official scale dtypes: fp16 weights give fp16 scales (fp32 is accepted too, spec §2.3).
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
