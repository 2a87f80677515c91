"""ChatGLM-6B model: official numerics (golden outputs), masks/positions, cache, generation, prefix, loading.

Golden numbers in tests/golden/chatglm6b_* were produced by the official modeling code on the tiny
weights stored beside them (see tests/golden/README.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

import chatglm_ptuning  # noqa: F401  (registers the Auto classes)
from chatglm_ptuning.configuration import ChatGLM6BConfig
from chatglm_ptuning.glm_positions import (
    glm_attention_mask,
    glm_position_ids,
    next_position_ids,
    padding_mask_from_block_mask,
)
from chatglm_ptuning.modeling_chatglm import ChatGLMForConditionalGeneration, glm_inv_freq

GOLDEN_DIR = Path(__file__).parent / "golden"
MASK, GMASK, SOP, EOP, PAD = 70, 71, 74, 75, 3  # special ids of the tiny config
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN_DIR / "chatglm6b_golden.safetensors")


@pytest.fixture(scope="module")
def official_weights() -> dict[str, torch.Tensor]:
    """Tiny weights in the official key layout (fp16), with a stray lm_head and inv_freq like the real files."""
    return load_file(GOLDEN_DIR / "chatglm6b_tiny.safetensors")


@pytest.fixture(scope="module")
def official_config() -> dict:
    return json.loads((GOLDEN_DIR / "chatglm6b_config.json").read_text())


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, official_weights, official_config) -> Path:
    folder = tmp_path_factory.mktemp("chatglm6b_official")
    (folder / "config.json").write_text(json.dumps(official_config))
    torch.save(official_weights, folder / "pytorch_model.bin")
    return folder


@contextlib.contextmanager
def transformers_warnings():
    """Collect warnings transformers logs (its loggers do not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger("transformers")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)


def load_official(folder: Path, **kwargs) -> ChatGLMForConditionalGeneration:
    with transformers_warnings() as records:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    messages = [r.getMessage() for r in records]
    assert not messages, messages
    return model.eval()


def tiny_config(**overrides) -> ChatGLM6BConfig:
    fields = dict(
        vocab_size=80, hidden_size=64, num_attention_heads=4, num_layers=2, inner_hidden_size=128,
        max_sequence_length=128, bos_token_id=SOP, eos_token_id=EOP, mask_token_id=MASK,
        gmask_token_id=GMASK, pad_token_id=PAD,
    )
    fields.update(overrides)
    return ChatGLM6BConfig(**fields)


@pytest.fixture(scope="module")
def model(official_dir) -> ChatGLMForConditionalGeneration:
    return load_official(official_dir)


@pytest.fixture(scope="module")
def prefix_model(official_dir, official_config, tmp_path_factory) -> ChatGLMForConditionalGeneration:
    """An older full-model P-tuning checkpoint: config carries pre_seq_len, weights hold the prefix encoder."""
    return load_official(ptuning_dir(tmp_path_factory, official_dir, official_config, projection=False))


def ptuning_dir(tmp_path_factory, official_dir: Path, official_config: dict, projection: bool) -> Path:
    folder = tmp_path_factory.mktemp("chatglm6b_ptuning")
    config = {**official_config, "pre_seq_len": 3, "prefix_projection": projection}
    (folder / "config.json").write_text(json.dumps(config))
    prefix = load_file(GOLDEN_DIR / f"chatglm6b_prefix{'_proj' if projection else ''}.safetensors")
    weights = torch.load(official_dir / "pytorch_model.bin")
    torch.save({**weights, **prefix}, folder / "pytorch_model.bin")
    return folder


# --------------------------------------------------------------------------------------------------
# numerics against the official code


def test_golden_logits_and_loss(model, golden):
    with torch.no_grad():
        out = model(golden["ids"], labels=golden["labels"])
    assert (out.logits - golden["plain_logits"]).abs().max() < LOGITS_ATOL
    assert (out.loss - golden["plain_loss"]).abs() < 1e-5


def test_golden_explicit_tokenizer_mask_and_positions(model, golden):
    """The original's 4D bool mask [b, 1, s, s] and [b, 2, s] positions (left-padded tokenizer batch)."""
    with torch.no_grad():
        out = model(
            golden["padded_ids"],
            attention_mask=golden["padded_mask4d"],
            position_ids=golden["padded_position_ids"],
        )
    assert (out.logits - golden["padded_logits"]).abs().max() < LOGITS_ATOL


def test_golden_150528_vocab_layout(official_dir, golden):
    """The pre-slim special ids (offset by the image tokens) come from the config alone."""
    ids = dict(bos_token_id=54, eos_token_id=55, mask_token_id=50, gmask_token_id=51, pad_token_id=20)
    model = load_official(official_dir, **ids)
    with torch.no_grad():
        logits = model(golden["ids_150528"]).logits
    assert (logits - golden["layout150528_logits"]).abs().max() < LOGITS_ATOL


def test_golden_1d_positions(official_dir, golden):
    model = load_official(official_dir, position_encoding_2d=False)
    with torch.no_grad():
        logits = model(golden["ids_1d"]).logits
    assert (logits - golden["pos1d_logits"]).abs().max() < LOGITS_ATOL


@pytest.mark.parametrize("projection", [False, True])
def test_golden_prefix_logits_loss_and_grads(tmp_path_factory, official_dir, official_config, golden, projection):
    tag = "prefix_proj" if projection else "prefix"
    model = load_official(ptuning_dir(tmp_path_factory, official_dir, official_config, projection))
    out = model(golden["ids"], labels=golden["labels"])
    out.loss.backward()
    assert (out.logits - golden[f"{tag}_logits"]).abs().max() < LOGITS_ATOL
    assert (out.loss - golden[f"{tag}_loss"]).abs() < 1e-5
    for name, param in model.transformer.prefix_encoder.named_parameters():
        expected = golden[f"{tag}_grad.{name}"]
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    with torch.no_grad():
        padded = model(
            golden["padded_ids"],
            attention_mask=golden["padded_mask4d"],
            position_ids=golden["padded_position_ids"],
        )
    assert (padded.logits - golden[f"{tag}_padded_logits"]).abs().max() < LOGITS_ATOL


def test_fp16_and_bf16_forward(official_dir, golden):
    model = load_official(official_dir)
    half = model.half()
    with torch.no_grad():
        logits = half(golden["ids"]).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    # the official `model.half()` on the same CPU kernels
    assert (logits.float() - golden["fp16_logits"]).abs().max() < 0.05
    bf16 = model.to(torch.bfloat16)
    assert bf16.transformer.layers[0].attention.rotary_emb.inv_freq.dtype == torch.float32  # not re-rounded
    with torch.no_grad():
        out = bf16(golden["ids"], labels=golden["labels"])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert (out.logits.float() - golden["plain_logits"]).abs().max() < 1.0
    assert out.loss.dtype == torch.bfloat16


def test_rotary_frequencies_are_fp16_rounded():
    assert glm_inv_freq(64)[:4].tolist() == [1.0, 0.75, 0.5625, pytest.approx(0.42163086, abs=1e-8)]


# --------------------------------------------------------------------------------------------------
# loading


def test_lm_head_tied_and_stored_copy_discarded(model, official_weights):
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and names.count("transformer.word_embeddings.weight") == 1
    stored = official_weights["transformer.word_embeddings.weight"].float()
    assert torch.equal(model.lm_head.weight, stored)
    assert not torch.equal(model.lm_head.weight, official_weights["lm_head.weight"].float())


def test_checkpoint_inv_freq_ignored(model):
    # the stored buffers hold 0.5 everywhere; the model recomputes 10000^(-2j/8)
    inv_freq = model.transformer.layers[1].attention.rotary_emb.inv_freq
    assert inv_freq.tolist() == glm_inv_freq(8).tolist() == pytest.approx([1.0, 0.1, 0.01, 0.001], rel=1e-3)
    assert not any("inv_freq" in key for key in model.state_dict())


def test_sharded_bins_with_index(tmp_path, official_dir, official_weights, model, golden):
    shutil.copy(official_dir / "config.json", tmp_path / "config.json")
    keys = sorted(official_weights)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    weight_map = {}
    for file, shard_keys in shards.items():
        torch.save({k: official_weights[k] for k in shard_keys}, tmp_path / file)
        weight_map.update({k: file for k in shard_keys})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    sharded = load_official(tmp_path)
    with torch.no_grad():
        assert torch.equal(sharded(golden["ids"]).logits, model(golden["ids"]).logits)


def test_full_ptuning_checkpoint_loads_prefix(prefix_model):
    stored = load_file(GOLDEN_DIR / "chatglm6b_prefix.safetensors")["transformer.prefix_encoder.embedding.weight"]
    assert torch.equal(prefix_model.transformer.prefix_encoder.embedding.weight, stored)
    assert prefix_model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# masks and positions


def test_derived_positions_and_mask_hand_worked():
    config = tiny_config()
    #             0  1  2      3    4   5   6
    ids = torch.tensor([
        [5, 6, GMASK, SOP, 20, 21, EOP],  # gMASK at 2, <sop> at 3
        [5, MASK, 7, 8, SOP, 30, 31],  # [MASK] at 1, <sop> at 4
    ])
    positions = glm_position_ids(ids, config)
    assert positions.tolist() == [
        [[0, 1, 2, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3, 4]],
        [[0, 1, 2, 3, 1, 1, 1], [0, 0, 0, 0, 1, 2, 3]],
    ]
    blocked = glm_attention_mask(ids, SOP)
    assert blocked.shape == (2, 1, 7, 7)
    # row 0: columns 0..2 open to all (bidirectional context), causal from <sop> on
    assert (~blocked[0, 0]).int().tolist() == [
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert (~blocked[1, 0, :, :4]).all() and (~blocked[1, 0]).int().sum().item() == 4 * 7 + 1 + 2 + 3
    one_d = glm_position_ids(ids, tiny_config(position_encoding_2d=False))
    assert one_d.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 1, 1, 1]]  # only [MASK] rows repeat


def test_left_padding_positions_and_mask():
    config = tiny_config()
    ids = torch.tensor([[PAD, PAD, 5, GMASK, SOP], [4, 5, 6, GMASK, SOP]])
    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = glm_position_ids(ids, config, keep)
    assert positions.tolist() == [[[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]], [[0, 1, 2, 3, 3], [0, 0, 0, 0, 1]]]
    blocked = glm_attention_mask(ids, SOP, keep)
    assert blocked[0, 0, :, :2].all()  # pad columns closed to every row
    assert (~blocked[0, 0, 2:, 2:]).int().tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    # the tokenizer's 4D mask reduces to the same keep-mask
    rows = []
    for n_pad in (2, 0):
        m = torch.ones(5, 5, dtype=torch.bool)
        m[n_pad:, n_pad:] = glm_attention_mask(ids[:1, n_pad:] if n_pad else ids[1:], SOP)[0, 0]
        rows.append(m)
    assert padding_mask_from_block_mask(torch.stack(rows)[:, None]).tolist() == keep.tolist()


def test_no_sop_means_all_context_and_no_mask_token_keeps_positions():
    ids = torch.tensor([[5, 6, 7]])
    assert (~glm_attention_mask(ids, SOP)).all()
    assert glm_position_ids(ids, tiny_config()).tolist() == [[[0, 1, 2], [0, 0, 0]]]
    assert glm_position_ids(torch.tensor([[5, SOP, 7]]), tiny_config()).tolist() == [[[0, 1, 2], [0, 1, 2]]]


def test_next_position_ids():
    two_d = torch.tensor([[[0, 1, 2, 2], [0, 0, 1, 2]]])
    assert next_position_ids(two_d, 2).tolist() == [[[0, 1, 2, 2, 2, 2], [0, 0, 1, 2, 3, 4]]]
    one_d = torch.tensor([[0, 1, 2, 3, 1], [0, 0, 0, 1, 2]])
    assert next_position_ids(one_d, 2).tolist() == [[0, 1, 2, 3, 1, 1, 1], [0, 0, 0, 1, 2, 3, 4]]


# --------------------------------------------------------------------------------------------------
# cache and generation


def prompts() -> list[list[int]]:
    return [[5, 6, 7, GMASK, SOP], [9, 8, 7, 6, 5, 4, GMASK, SOP], [11, MASK, 12, SOP]]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    keep = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, keep


@pytest.mark.parametrize("with_prefix", [False, True])
def test_cached_forward_loop_matches_uncached(model, prefix_model, with_prefix):
    lm = prefix_model if with_prefix else model
    ids, keep = left_pad(prompts())
    new_tokens = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]])
    cache = DynamicCache(config=lm.config)
    positions = glm_position_ids(ids, lm.config, keep)
    with torch.no_grad():
        step = lm(ids, attention_mask=keep, position_ids=positions, cache=cache, use_cache=True)
        cached = [step.logits[:, -1]]
        for t in range(new_tokens.shape[1]):
            positions = next_position_ids(positions)
            keep = torch.cat((keep, torch.ones_like(keep[:, :1])), dim=1)
            step = lm(new_tokens[:, t : t + 1], attention_mask=keep, position_ids=positions[..., -1:], cache=step.cache)
            cached.append(step.logits[:, -1])
        full_ids = torch.cat((ids, new_tokens), dim=1)
        full = lm(full_ids, attention_mask=keep, use_cache=False).logits
    assert cache.get_seq_length() == full_ids.shape[1]  # the prefix never enters the cache
    torch.testing.assert_close(torch.stack(cached, 1), full[:, ids.shape[1] - 1 :], rtol=1e-5, atol=1e-5)


def greedy(lm, ids, **kwargs) -> torch.Tensor:
    out = lm.generate(ids, max_new_tokens=6, do_sample=False, num_beams=1, **kwargs)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("with_prefix", [False, True])
def test_batched_left_padded_greedy_equals_single_rows(model, prefix_model, with_prefix):
    lm = prefix_model if with_prefix else model
    ids, keep = left_pad(prompts())
    batched = greedy(lm, ids, attention_mask=keep)
    for row, prompt in enumerate(prompts()):
        single = greedy(lm, torch.tensor([prompt]))
        assert batched[row].tolist() == single[0].tolist()
    assert greedy(lm, ids, attention_mask=keep, use_cache=False).tolist() == batched.tolist()


def test_generate_with_tokenizer_mask_and_positions(model, golden):
    ids = golden["padded_ids"]
    from_4d = greedy(model, ids, attention_mask=golden["padded_mask4d"], position_ids=golden["padded_position_ids"])
    keep = padding_mask_from_block_mask(golden["padded_mask4d"])
    assert from_4d.tolist() == greedy(model, ids, attention_mask=keep).tolist()


def test_beam_search_and_sampling_run(prefix_model):
    ids, keep = left_pad(prompts())
    beams = prefix_model.generate(ids, attention_mask=keep, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (3, ids.shape[1] + 4)
    single = prefix_model.generate(torch.tensor([prompts()[1]]), max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams[1, ids.shape[1] :].tolist() == single[0, -4:].tolist()
    torch.manual_seed(0)
    sampled = prefix_model.generate(
        ids, attention_mask=keep, max_new_tokens=4, do_sample=True, top_p=0.7, temperature=0.95
    )
    assert sampled.shape == (3, ids.shape[1] + 4)


def test_forward_api_aliases(model, golden):
    ids = golden["ids"][:1, :6]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        assert out.cache is cache and cache.get_seq_length() == 6
        as_tuple = model(ids, labels=ids, return_dict=False, use_cache=False)
    assert len(as_tuple) == 2 and as_tuple[1].shape == (1, 6, 80)
    embeds = model.transformer.word_embeddings(ids)
    positions = glm_position_ids(ids, model.config)
    with torch.no_grad():
        from_embeds = model(inputs_embeds=embeds, position_ids=positions, attention_mask=glm_attention_mask(ids, SOP))
        assert torch.equal(from_embeds.logits, model(ids).logits)
    with pytest.raises(ValueError, match="without input_ids"):
        model(inputs_embeds=embeds)
    with pytest.raises(TypeError, match="Cache"):
        model(ids, past_key_values=((torch.zeros(1),) * 2,) * 2)
    with pytest.raises(ValueError, match="position_ids are required"):
        model(ids[:, -1:], cache=cache)


# --------------------------------------------------------------------------------------------------
# P-tuning training


def test_only_prefix_trainable_and_gets_grads(prefix_model, golden):
    trainable = [name for name, p in prefix_model.named_parameters() if p.requires_grad]
    assert trainable == ["transformer.prefix_encoder.embedding.weight"]
    prefix_model.zero_grad(set_to_none=True)
    prefix_model(golden["ids"], labels=golden["labels"]).loss.backward()
    grads = {name: p.grad for name, p in prefix_model.named_parameters()}
    assert grads.pop("transformer.prefix_encoder.embedding.weight").abs().sum() > 0
    assert all(g is None for g in grads.values())
    prefix_model.zero_grad(set_to_none=True)


def test_prefix_dropout_only_in_training(prefix_model, golden):
    ids = golden["ids"]
    with torch.no_grad():
        assert torch.equal(prefix_model(ids).logits, prefix_model(ids).logits)
        prefix_model.train()
        try:
            assert not torch.equal(prefix_model(ids).logits, prefix_model(ids).logits)
        finally:
            prefix_model.eval()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_prefix_grads(
    official_dir, official_config, tmp_path_factory, golden, use_reentrant
):
    lm = load_official(ptuning_dir(tmp_path_factory, official_dir, official_config, projection=True)).train()

    def prefix_grads() -> dict[str, torch.Tensor]:
        lm.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # same prefix-dropout draw in both runs
        lm(golden["ids"], labels=golden["labels"]).loss.backward()
        return {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}

    plain = prefix_grads()
    lm.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in lm.transformer.layers)
    checkpointed = prefix_grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 5
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_random_init_from_config():
    """A model built from a config (no checkpoint) initialises, ties, and freezes for P-tuning."""
    lm = ChatGLMForConditionalGeneration(tiny_config(pre_seq_len=2, prefix_projection=True))
    assert lm.lm_head.weight is lm.transformer.word_embeddings.weight
    assert torch.isfinite(lm(torch.tensor([[5, GMASK, SOP, 6]])).logits).all()
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == {
        f"transformer.prefix_encoder.{n}" for n, _ in lm.transformer.prefix_encoder.named_parameters()
    }
