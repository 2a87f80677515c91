"""Loading official-layout folders and prefix checkpoints: Auto classes, load_model, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from official_layout import REPO_ROOT, random_official_state, random_prefix_state, tiny_config, write_tiny_checkpoint

import chatglm_ptuning  # noqa: F401 - registers the Auto classes
from chatglm_ptuning import checkpoint, load_model, loading
from chatglm_ptuning.official_format import write_official_folder
from chatglm_ptuning.checkpoint import CheckpointError, PromptSettings, read_prefix_checkpoint, save_prefix_checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

GLM2_IDS = torch.tensor([[64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211]])
GLM1_IDS = torch.tensor([[5, 74874, 130001, 130004, 5, 100]])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["chatglm2", "chatglm"])
def test_auto_classes_load_official_folder_offline_in_a_clean_process(tmp_path, arch, shared_tokenizers):
    folder = write_tiny_checkpoint(tmp_path / "m", arch)
    code = (
        "import chatglm_ptuning, transformers, sys;"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r});"
        f"t = transformers.AutoTokenizer.from_pretrained({str(folder)!r});"
        "print(type(m).__name__, type(t).__name__)"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = "ChatGLMForConditionalGeneration" if arch == "chatglm" else "ChatGLM2ForConditionalGeneration"
    assert out.stdout.split()[0] == expected


def test_auto_config_and_model_dispatch_by_family(tiny_glm1_dir, tiny_glm2_dir):
    assert AutoConfig.from_pretrained(tiny_glm1_dir).architecture == "chatglm"
    assert AutoConfig.from_pretrained(tiny_glm2_dir).architecture == "chatglm2"
    assert type(AutoModel.from_pretrained(tiny_glm2_dir)).__name__ == "ChatGLM2ForConditionalGeneration"
    assert type(AutoTokenizer.from_pretrained(tiny_glm1_dir)).__name__ == "ChatGLM6BTokenizer"


@pytest.mark.parametrize("fmt,shards", [("bin", 1), ("bin", 3), ("safetensors", 1), ("safetensors", 2)])
def test_load_model_matches_from_pretrained_in_every_weight_format(tmp_path, fmt, shards, shared_tokenizers):
    folder = write_tiny_checkpoint(tmp_path / "m", "chatglm2", fmt=fmt, num_shards=shards)
    model, tokenizer = load_model(folder, device="cpu", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(tokenizer).__name__ == "ChatGLM2Tokenizer"
    assert torch.equal(_logits(model, GLM2_IDS), _logits(reference, GLM2_IDS))


def test_load_model_glm1_uses_word_embeddings_as_output_matrix(tmp_path, shared_tokenizers):
    folder = write_tiny_checkpoint(tmp_path / "m", "chatglm")
    # Make the stored lm_head differ: the official loader discards it (tied to word_embeddings).
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    shard = folder / index["weight_map"]["lm_head.weight"]
    state = torch.load(shard, weights_only=True)
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    torch.save(state, shard)
    model, _ = load_model(folder, device="cpu", dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()
    assert model.lm_head.weight.abs().sum() > 0


def test_chatglm3_tokenizer_is_chosen_from_the_folder(tiny_glm3_dir):
    _, tokenizer = load_model(tiny_glm3_dir, device="cpu")
    assert type(tokenizer).__name__ == "ChatGLM3Tokenizer"


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_checkpoint_round_trip_in_both_formats(tmp_path, tiny_glm2_dir, projection):
    config = tiny_config("chatglm2", pre_seq_len=6, prefix_projection=projection)
    prefix = random_prefix_state(config)
    ours = save_prefix_checkpoint(
        prefix, tmp_path / "ours", PromptSettings("chatglm2", 6, projection, base_model=str(tiny_glm2_dir))
    )
    official = tmp_path / "official"
    official.mkdir()
    torch.save(prefix, official / "pytorch_model.bin")
    (official / "config.json").write_text(json.dumps({**json.loads((tiny_glm2_dir / "config.json").read_text()),
                                                      "pre_seq_len": 6, "prefix_projection": projection}))

    model_a, _ = load_model(tiny_glm2_dir, ptuning_checkpoint=ours, device="cpu", dtype=torch.float32)
    model_b, _ = load_model(tiny_glm2_dir, ptuning_checkpoint=official, device="cpu", dtype=torch.float32)
    assert model_a.config.pre_seq_len == 6 and model_a.config.prefix_projection is projection
    for key, tensor in prefix.items():
        assert torch.equal(model_a.state_dict()[key], tensor)
        assert model_a.state_dict()[key].dtype == torch.float32
    assert torch.equal(_logits(model_a, GLM2_IDS), _logits(model_b, GLM2_IDS))
    no_prefix, _ = load_model(tiny_glm2_dir, device="cpu", dtype=torch.float32)
    assert not torch.allclose(_logits(model_a, GLM2_IDS), _logits(no_prefix, GLM2_IDS))


def test_saved_prefix_is_safetensors_with_settings_and_nothing_else(tmp_path):
    config = tiny_config("chatglm2", pre_seq_len=4)
    folder = save_prefix_checkpoint(random_prefix_state(config), tmp_path / "c", PromptSettings("chatglm2", 4, False))
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "ptuning_config.json"]
    state, settings = read_prefix_checkpoint(folder)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    assert settings == PromptSettings("chatglm2", 4, False)


def test_prefix_in_bf16_model_stays_fp32_and_trainable(tiny_glm2_dir):
    model, _ = load_model(tiny_glm2_dir, pre_seq_len=4, device="cpu", dtype=torch.bfloat16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"transformer.prefix_encoder.embedding.weight"}
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32
    assert model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.bfloat16
    model.half()
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32
    std = model.transformer.prefix_encoder.embedding.weight.std().item()
    assert 0.8 < std < 1.2  # PyTorch's default Embedding init, as the original's


def _prefix_folder(tmp_path, arch, pre_seq_len, projection):
    config = tiny_config(arch, pre_seq_len=pre_seq_len, prefix_projection=projection)
    return save_prefix_checkpoint(
        random_prefix_state(config), tmp_path / f"{arch}-{pre_seq_len}-{projection}", PromptSettings(arch, pre_seq_len, projection)
    )


def test_mismatched_prefix_settings_are_one_clear_error(tmp_path, tiny_glm2_dir):
    ckpt = _prefix_folder(tmp_path, "chatglm2", 4, False)
    with pytest.raises(CheckpointError, match="pre_seq_len 4 but pre_seq_len 8"):
        load_model(tiny_glm2_dir, ptuning_checkpoint=ckpt, pre_seq_len=8, device="cpu")
    with pytest.raises(CheckpointError, match="prefix_projection False but prefix_projection True"):
        load_model(tiny_glm2_dir, ptuning_checkpoint=ckpt, prefix_projection=True, device="cpu")
    glm1 = _prefix_folder(tmp_path, "chatglm", 4, False)
    with pytest.raises(CheckpointError, match="'chatglm' model but the base model is 'chatglm2'"):
        load_model(tiny_glm2_dir, ptuning_checkpoint=glm1, device="cpu")


def test_official_prefix_from_another_architecture_is_caught_by_shape(tmp_path, tiny_glm2_dir):
    # An official checkpoint without config.json: only the tensor width can tell.
    folder = tmp_path / "wrong"
    folder.mkdir()
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 999)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"has shape \[4, 999\] but this base model needs \[4, 64\]"):
        load_model(tiny_glm2_dir, ptuning_checkpoint=folder, device="cpu")


def test_bad_folders_get_clear_errors_naming_the_file(tmp_path, tiny_glm2_dir):
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_model(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(empty)

    missing_shard = tmp_path / "missing"
    shutil.copytree(tiny_glm2_dir, missing_shard)
    (missing_shard / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="missing from .*pytorch_model-00002-of-00002.bin"):
        load_model(missing_shard, device="cpu")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_glm2_dir, corrupt)
    (corrupt / "pytorch_model-00001-of-00002.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00002.bin: cannot read weights"):
        load_model(corrupt, device="cpu")

    wrong_shape = tmp_path / "shape"
    shutil.copytree(tiny_glm2_dir, wrong_shape)
    config = json.loads((wrong_shape / "config.json").read_text())
    config["ffn_hidden_size"] = 40
    (wrong_shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp.dense_h_to_4h.weight' has shape \[96, 32\] but the model .* expects \[80, 32\]"):
        load_model(wrong_shape, device="cpu")

    not_prefix = tmp_path / "notprefix"
    shutil.copytree(tiny_glm2_dir, not_prefix)
    with pytest.raises(CheckpointError, match="not a P-tuning checkpoint"):
        load_model(tiny_glm2_dir, ptuning_checkpoint=not_prefix, device="cpu")


def test_old_full_model_ptuning_checkpoint_loads_directly(tmp_path, shared_tokenizers):
    folder = write_tiny_checkpoint(tmp_path / "full", "chatglm2", with_prefix=True, pre_seq_len=4, prefix_projection=False)
    model, _ = load_model(folder, device="cpu", dtype=torch.float32)
    assert model.config.pre_seq_len == 4
    stored = torch.load(folder / "pytorch_model-00002-of-00002.bin", weights_only=True)
    key = "transformer.prefix_encoder.embedding.weight"
    assert torch.equal(model.state_dict()[key], stored[key].float())
    # ...and as a P-tuning checkpoint on top of the plain base
    state, settings = read_prefix_checkpoint(folder)
    assert settings.pre_seq_len == 4 and not settings.prefix_projection and list(state) == [key]


# --------------------------------------------------------------------------------------
# Long-context variants: which RoPE rule a folder gets
# --------------------------------------------------------------------------------------

LONG_CONTEXT = {  # folder name: (tokenizer, rope_ratio, the original's rule)
    "chatglm2-6b-32k": ("chatglm2-6b", 16, "interpolate"),
    "chatglm3-6b-32k": ("chatglm3-6b", 50, "base"),
    "chatglm3-6b-128k": ("chatglm3-6b", 500, "base"),
}


def _expected_cos(rope_ratio: float, mode: str, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """cos of the original's rotary cache at `positions` (chatglm2-6b-32k: seq_idx / rope_ratio;
    chatglm3-6b-32k/128k: base 10000 * rope_ratio)."""
    n_elem = head_dim // 2
    base = 10000 * (rope_ratio if mode == "base" else 1)
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    seq_idx = torch.arange(int(positions.max()) + 1, dtype=torch.float)
    if mode == "interpolate":
        seq_idx = seq_idx / rope_ratio
    return torch.cos(torch.outer(seq_idx, theta))[positions]


def _long_context_folder(root, name: str, **tokenizer_config_changes):
    tokenizer, rope_ratio, _ = LONG_CONTEXT.get(name.split("/")[-1], LONG_CONTEXT["chatglm2-6b-32k"])
    folder = write_tiny_checkpoint(root / name, "chatglm2", tokenizer=tokenizer, num_shards=1, rope_ratio=rope_ratio)
    if tokenizer_config_changes:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text())
        for key, value in tokenizer_config_changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return folder


def _check_rule(model, rope_ratio: float, mode: str) -> None:
    positions = torch.tensor([[0, 1, 2, 3, 200, 255]])
    cos, _ = model.transformer.rotary_pos_emb(positions, torch.float32)
    assert torch.equal(cos[:, 0], _expected_cos(rope_ratio, mode, positions, model.config.kv_channels))


@pytest.mark.parametrize("name", sorted(LONG_CONTEXT))
def test_long_context_folders_get_their_originals_rope_rule(tmp_path, name, shared_tokenizers, monkeypatch):
    _, rope_ratio, mode = LONG_CONTEXT[name]
    folder = _long_context_folder(tmp_path, name)
    said = []
    monkeypatch.setattr(chatglm_ptuning.loading.logger, "warning", lambda message, *args: said.append(message % args))
    loaded, _ = load_model(folder, device="cpu", dtype=torch.float32)
    assert loaded.config.rope_scaling_mode == mode
    assert len(said) == 1 and f"rope_scaling_mode={mode!r}" in said[0] and f"rope_ratio {rope_ratio}" in said[0]
    auto = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert auto.config.rope_scaling_mode == mode
    for model in (loaded, auto):
        _check_rule(model, rope_ratio, mode)
    assert torch.equal(_logits(loaded, GLM2_IDS), _logits(auto, GLM2_IDS))
    other = "base" if mode == "interpolate" else "interpolate"
    overridden, _ = load_model(folder, device="cpu", dtype=torch.float32, rope_scaling_mode=other)
    _check_rule(overridden, rope_ratio, other)
    assert not torch.allclose(_logits(loaded, GLM2_IDS), _logits(overridden, GLM2_IDS), atol=1e-4)


def test_a_renamed_chatglm2_32k_folder_keeps_the_chatglm2_rule(tmp_path, shared_tokenizers):
    """No name anywhere: the ChatGLM2 tokenizer (tokenizer.model without ChatGLM3 marks) decides."""
    folder = _long_context_folder(tmp_path, "my-long-model", name_or_path=None)
    model, tokenizer = load_model(folder, device="cpu", dtype=torch.float32)
    assert type(tokenizer).__name__ == "ChatGLM2Tokenizer"
    assert model.config.rope_scaling_mode == "interpolate"
    _check_rule(model, 16, "interpolate")


@pytest.mark.parametrize("mark", [{"chatglm_version": 3}, {"added_tokens_decoder": {"64795": {"content": "<|user|>"}}}])
def test_a_renamed_chatglm3_folder_is_told_by_its_tokenizer_config(tmp_path, shared_tokenizers, mark):
    folder = _long_context_folder(tmp_path, "renamed", name_or_path=None, **mark)
    model, _ = load_model(folder, device="cpu", dtype=torch.float32)
    assert model.config.rope_scaling_mode == "base"


def test_the_chosen_rule_is_saved_and_explicit_config_wins(tmp_path, shared_tokenizers):
    folder = _long_context_folder(tmp_path, "chatglm2-6b-32k")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved-as-chatglm3-name")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved-as-chatglm3-name", dtype=torch.float32)
    assert reloaded.config.rope_scaling_mode == "interpolate"
    forced = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, rope_scaling_mode="base")
    _check_rule(forced, 16, "base")
    with pytest.raises(ValueError, match="rope_scaling_mode must be one of"):
        load_model(folder, device="cpu", rope_scaling_mode="yarn")


# --------------------------------------------------------------------------------------
# Streaming: tensor by tensor, a shard is never wholly resident
# --------------------------------------------------------------------------------------

_MAPPING_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def _mapped_resident_bytes(path) -> int:
    """Bytes of `path` resident in this process's memory maps (/proc/self/smaps Rss)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if _MAPPING_HEADER.match(line):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="measures Linux memory maps")
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("bits", [None, 4])
def test_loading_streams_tensor_by_tensor(tmp_path, monkeypatch, fmt, bits):
    """One 9 MB shard whose largest tensor is 2 MB: while each tensor is copied (or quantized) into the
    model, at most that tensor (plus a few neighbouring pages) of the shard is resident."""
    config = tiny_config(
        "chatglm2", hidden_size=512, ffn_hidden_size=1024, kv_channels=64, num_attention_heads=8, padded_vocab_size=256
    )
    state = random_official_state(config)
    folder = write_official_folder(config, state, tmp_path / "model", fmt=fmt, num_shards=1)
    shard = next(folder.glob(f"*.{'bin' if fmt == 'bin' else 'safetensors'}"))
    largest = max(t.numel() * t.element_size() for t in state.values())
    shard_bytes = shard.stat().st_size
    assert shard_bytes > 4 * largest
    original = loading.iter_weight_tensors
    resident: list[int] = []

    def watched(where):
        for item in original(where):
            yield item
            resident.append(_mapped_resident_bytes(shard))  # the consumer is done with this tensor; not yet released

    monkeypatch.setattr(loading, "iter_weight_tensors", watched)
    model = loading.load_model_weights(folder, quantization_bit=bits, device="cpu", dtype=torch.float32)
    assert len(resident) == len(state)
    assert max(resident) <= largest + 512 * 1024, (max(resident), largest, shard_bytes)  # + header, fault-around
    monkeypatch.setattr(loading, "iter_weight_tensors", original)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)  # the fp16 weights, as stored
    if bits:
        reference.quantize(bits)  # quantize-while-loading quantizes the stored fp16 tensors
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    assert torch.equal(_logits(model, ids), _logits(reference.float(), ids))


def test_legacy_non_zip_bin_loads_whole_and_says_so(tmp_path, monkeypatch):
    config = tiny_config("chatglm2")
    state = random_official_state(config)
    zipped = write_official_folder(config, state, tmp_path / "zip", fmt="bin", num_shards=1)
    legacy = write_official_folder(config, state, tmp_path / "legacy", fmt="bin", num_shards=1)
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    said = []
    monkeypatch.setattr(checkpoint.logger, "warning", lambda message, *args: said.append(message % args))
    old = loading.load_model_weights(legacy, device="cpu", dtype=torch.float32)
    assert len(said) == 1 and "legacy (non-zip) torch.save format" in said[0] and "legacy" in said[0]
    new = loading.load_model_weights(zipped, device="cpu", dtype=torch.float32)
    assert len(said) == 1
    for key, tensor in new.state_dict().items():
        assert torch.equal(old.state_dict()[key], tensor), key


def test_load_options_are_the_one_list_of_loading_settings(tiny_glm2_dir):
    from chatglm_ptuning.loading import LoadOptions

    options = LoadOptions(pre_seq_len=4, device="cpu", dtype="float32")
    by_options = loading.load_model_weights(tiny_glm2_dir, options)
    by_keywords = loading.load_model_weights(tiny_glm2_dir, pre_seq_len=4, device="cpu", dtype="float32")
    assert by_options.config.pre_seq_len == by_keywords.config.pre_seq_len == 4
    assert loading.load_model_weights(tiny_glm2_dir, options, pre_seq_len=2).config.pre_seq_len == 2  # keywords win
    with pytest.raises(TypeError, match="pre_seq_length"):
        loading.load_model(tiny_glm2_dir, pre_seq_length=4)
