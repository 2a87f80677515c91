"""ChatGLM2-6B / ChatGLM3-6B model: numerics against the official code, caching, generation, P-tuning.

The golden numbers in tests/golden/chatglm2/ come from the official modeling_chatglm.py run on the same tiny
weights (see the README there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache

from chatglm_ptuning import ChatGLM2ForConditionalGeneration, ChatGLMConfig, head_loss
from chatglm_ptuning.modeling_chatglm2 import attend_grouped_single_query, build_attention_mask, expand_groups
from chatglm_ptuning.official_format import write_state_dict

GOLDEN = Path(__file__).parent / "golden" / "chatglm2"
PRE_SEQ_LEN = 4
VARIANTS = (None, "prefix", "projection")  # no prefix; P-tuning v2; P-tuning v2 with prefix_projection
LOGITS_ATOL = 1e-4  # the official code's fp32 logits


def tag(variant: str | None) -> str:
    return variant or "base"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "outputs.safetensors")


@pytest.fixture(scope="module")
def official_config() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


@pytest.fixture(scope="module")
def build(official_config):
    """build(variant, **config_overrides) -> the golden weights in a fresh model, eval mode."""
    weights = load_file(GOLDEN / "weights.safetensors")

    def _build(variant: str | None = None, **overrides) -> ChatGLM2ForConditionalGeneration:
        fields = {**official_config, **overrides}
        if variant:
            fields.update(pre_seq_len=PRE_SEQ_LEN, prefix_projection=variant == "projection")
        model = ChatGLM2ForConditionalGeneration(ChatGLMConfig(**fields))
        state = dict(weights)
        if variant:
            state.update(load_file(GOLDEN / f"{variant}_encoder.safetensors"))
        model.load_state_dict(state, strict=True)
        return model.eval()

    return _build


@pytest.fixture(scope="module")
def padded(golden) -> dict[str, torch.Tensor]:
    """A left-padded batch as the tokenizer makes it (pads: id 0, mask 0, position 0), with labels."""
    return {k: golden[f"inputs.padded.{k}"] for k in ("input_ids", "attention_mask", "position_ids", "labels")}


def prompt(padded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: padded[k] for k in ("input_ids", "attention_mask", "position_ids")}


def greedy_loop(model, input_ids, attention_mask, position_ids, steps: int) -> torch.Tensor:
    """Greedy decoding with a full forward per token and no cache: what generate() must reproduce."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, token], -1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], -1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], -1)
    return input_ids


# ---- numerics against the official code -------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_loss_and_prefix_grads_match_official(build, golden, padded, variant):
    model = build(variant)
    out = model(**padded)
    name = tag(variant)
    torch.testing.assert_close(out.logits, golden[f"{name}.padded.logits"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.loss.reshape(1), golden[f"{name}.padded.loss"], atol=1e-5, rtol=0)
    with torch.no_grad():  # no mask, no positions: the original's causal path and default positions
        plain = model(golden["inputs.plain.input_ids"]).logits
    torch.testing.assert_close(plain, golden[f"{name}.plain.logits"], atol=LOGITS_ATOL, rtol=0)
    if variant:
        out.loss.backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grad_key = f"{name}.padded.grad."
        expected = {k[len(grad_key) :]: v for k, v in golden.items() if k.startswith(grad_key)}
        assert trainable.keys() == expected.keys()
        for key, param in trainable.items():
            torch.testing.assert_close(param.grad, expected[key], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("chunk_elements", [2**24, 3 * 64])  # one chunk; several, with a ragged last one
def test_training_loss_through_the_frozen_head_matches_official(build, golden, padded, chunk_elements, monkeypatch):
    """In training the frozen head is fused with the loss (labelled positions only, chunked):
    no logits come back, and loss and prefix gradients are still the original's."""
    monkeypatch.setattr(head_loss, "CHUNK_LOGIT_ELEMENTS", chunk_elements)
    model = build("projection").train()
    model.transformer.dropout.p = 0.0  # the official numbers were taken without prefix dropout
    out = model(**padded)
    assert out.logits is None
    torch.testing.assert_close(out.loss.reshape(1), golden["projection.padded.loss"], atol=1e-5, rtol=0)
    (out.loss * 0.5).backward()  # as gradient accumulation over two steps scales it
    for key, param in model.named_parameters():
        if param.requires_grad:
            expected = golden[f"projection.padded.grad.{key}"] * 0.5
            torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_steps_match_official(build, golden, padded, variant):
    """Prefill into a DynamicCache, then 1 new token, then 2 at once (the mask-with-past path)."""
    model = build(variant)
    ids, mask, pos = padded["input_ids"], padded["attention_mask"], padded["position_ids"]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos, cache=cache)
        assert cache.get_seq_length() == ids.shape[1]  # the prefix never enters the cache
        assert cache.layers[0].keys.shape == (3, 2, ids.shape[1], 16)  # [b, groups, seq, head_dim]
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], -1)
        pos = pos[:, -1:] + 1
        step1 = model(golden["inputs.step1.input_ids"], attention_mask=mask, position_ids=pos, cache=cache).logits
        mask = torch.cat([mask, torch.ones(3, 2, dtype=mask.dtype)], -1)
        pos = pos + torch.arange(1, 3)
        step2 = model(golden["inputs.step2.input_ids"], attention_mask=mask, position_ids=pos, cache=cache).logits
    torch.testing.assert_close(step1, golden[f"{tag(variant)}.step1.logits"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(step2, golden[f"{tag(variant)}.step2.logits"], atol=LOGITS_ATOL, rtol=0)


def test_rope_ratio_scales_the_base(build, golden, padded):
    with torch.no_grad():
        logits = build(rope_ratio=2.0)(**prompt(padded)).logits
    torch.testing.assert_close(logits, golden["rope_ratio2.padded.logits"], atol=LOGITS_ATOL, rtol=0)


def _official_rope_cache(seq_len: int, n_elem: int, rope_ratio: float, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """The original RotaryEmbedding.forward_impl cache [seq_len, n_elem/2, 2] (cos, sin), written from the two
    originals: chatglm2-6b-32k divides `seq_idx` by rope_ratio, chatglm3-6b-32k/128k multiply `base` by it."""
    base = 10000 * (rope_ratio if mode == "base" else 1)
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    seq_idx = torch.arange(seq_len, dtype=torch.float)
    if mode == "interpolate":
        seq_idx = seq_idx / rope_ratio
    idx_theta = torch.outer(seq_idx, theta).float()
    cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
    return cache.to(dtype) if dtype in (torch.float16, torch.bfloat16) else cache


@pytest.mark.parametrize("mode,rope_ratio", [("interpolate", 16), ("base", 50), ("base", 500), ("interpolate", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_angles_follow_each_originals_formula(official_config, mode, rope_ratio, dtype):
    config = ChatGLMConfig(**{**official_config, "rope_ratio": rope_ratio, "rope_scaling_mode": mode})
    rotary = ChatGLM2ForConditionalGeneration(config).transformer.rotary_pos_emb
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 1, 2, 3, 4, 5], [20000, 25000, 30000, 32767, 5, 6, 7, 9]])
    cos, sin = rotary(positions, dtype)
    cache = _official_rope_cache(32768, config.kv_channels // 2, rope_ratio, mode, dtype)[positions]  # the original's rotary_pos_emb[position_ids]
    assert torch.equal(cos[:, 0], cache[..., 0]) and torch.equal(sin[:, 0], cache[..., 1])


def test_rope_modes_differ_and_none_is_the_base_rule(official_config):
    positions = torch.arange(64)[None]
    rotary = {
        mode: ChatGLM2ForConditionalGeneration(
            ChatGLMConfig(**{**official_config, "rope_ratio": 16, "rope_scaling_mode": mode})
        ).transformer.rotary_pos_emb(positions, torch.float32)
        for mode in ("interpolate", "base", None)
    }
    assert torch.equal(rotary[None][0], rotary["base"][0])
    assert not torch.allclose(rotary["interpolate"][0], rotary["base"][0], atol=1e-2)
    with pytest.raises(ValueError, match="rope_scaling_mode must be one of"):
        ChatGLMConfig(**{**official_config, "rope_scaling_mode": "yarn"})


def test_rope_ratio2_base_rule_matches_official_golden(build, golden, padded):
    with torch.no_grad():
        logits = build(rope_ratio=2.0, rope_scaling_mode="base")(**prompt(padded)).logits
        interpolated = build(rope_ratio=2.0, rope_scaling_mode="interpolate")(**prompt(padded)).logits
    torch.testing.assert_close(logits, golden["rope_ratio2.padded.logits"], atol=LOGITS_ATOL, rtol=0)
    assert (interpolated - golden["rope_ratio2.padded.logits"]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_interpolation_is_positions_divided_by_rope_ratio_with_cache_and_prefix(build, padded, variant):
    """chatglm2-6b-32k: every forward (prefill, then cached steps, with or without a prefix) equals the
    rope_ratio-1 model at the fractional positions p / rope_ratio (the original's seq_idx / rope_ratio)."""
    ratio = 16
    model = build(variant, rope_ratio=ratio, rope_scaling_mode="interpolate")
    reference = build(variant)  # rope_ratio 1: angles are position * theta with base 10000
    ids, mask, pos = padded["input_ids"], padded["attention_mask"], padded["position_ids"]
    caches = DynamicCache(config=model.config), DynamicCache(config=reference.config)
    with torch.no_grad():
        for step in range(3):
            got = model(ids, attention_mask=mask, position_ids=pos, cache=caches[0]).logits
            want = reference(ids, attention_mask=mask, position_ids=pos.float() / ratio, cache=caches[1]).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            ids = got[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(ids)], -1)
            pos = pos[:, -1:] + 1


def test_mask_rules():
    """The official mask rules: causal + past columns, pad columns blocked, pad rows un-blocked only without a past."""
    pad = torch.tensor([[0, 1, 1]])
    assert build_attention_mask(None, 3, 0) is None  # plain causal: SDPA's is_causal
    assert build_attention_mask(torch.ones(1, 5), 1, 4) is None  # one new token, no pads: attend to all
    no_past = build_attention_mask(pad, 3, 0)[0, 0]
    assert no_past.tolist() == [[True, True, True], [False, True, False], [False, True, True]]
    with_past = build_attention_mask(torch.tensor([[1, 1, 0, 1, 1]]), 3, 2)[0, 0]
    assert with_past.tolist() == [
        [True, True, False, False, False],
        [True, True, False, True, False],
        [True, True, False, True, True],
    ]


@pytest.mark.parametrize("with_mask", [False, True])
def test_grouped_single_query_attention_equals_expanded_heads(with_mask):
    """The decoding step reads each key/value group once; the result is the per-head expansion's."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator) for shape in ([3, 8, 1, 16], [3, 2, 7, 16], [3, 2, 7, 16]))
    mask = torch.rand(3, 1, 1, 7, generator=generator) > 0.3 if with_mask else None
    if mask is not None:
        mask[..., -1] = True
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, expand_groups(k, 8), expand_groups(v, 8), attn_mask=mask
    )
    torch.testing.assert_close(attend_grouped_single_query(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)


# ---- loading official folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [1, 3])
def test_loads_official_folder_without_key_warnings(tmp_path, golden, padded, num_shards):
    shutil.copy(GOLDEN / "config.json", tmp_path / "config.json")  # official keys, auto_map, torch_dtype float16
    write_state_dict(load_file(GOLDEN / "weights.safetensors"), tmp_path, fmt="bin", num_shards=num_shards)

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert isinstance(model, ChatGLM2ForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model.eval()(**prompt(padded)).logits
    torch.testing.assert_close(logits, golden["base.padded.logits"], atol=LOGITS_ATOL, rtol=0)

    half = AutoModel.from_pretrained(tmp_path)  # the official auto_map sends AutoModel to the LM class too
    assert isinstance(half, ChatGLM2ForConditionalGeneration) and half.dtype == torch.float16


def test_embedding_accessors(build):
    model = build()
    assert model.get_input_embeddings() is model.transformer.embedding.word_embeddings
    assert model.get_output_embeddings() is model.transformer.output_layer
    replacement = torch.nn.Embedding(128, 64)
    model.set_input_embeddings(replacement)
    assert model.transformer.embedding.word_embeddings is replacement


# ---- generation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [None, "prefix"])
def test_generate_greedy_matches_uncached_loop(build, padded, variant):
    model = build(variant)
    expected = greedy_loop(model, *prompt(padded).values(), steps=6)
    generated = model.generate(**prompt(padded), max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("variant", [None, "prefix"])
def test_left_padded_batch_matches_single_rows(build, padded, variant):
    model = build(variant)
    batch = model.generate(**prompt(padded), max_new_tokens=6, do_sample=False)
    for row in range(batch.shape[0]):
        start = int((padded["attention_mask"][row] == 0).sum())
        single = {k: v[row : row + 1, start:] for k, v in prompt(padded).items()}
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0], batch[row, start:])


def test_generate_without_position_ids_counts_from_each_rows_first_token(build, padded):
    """No position_ids: pads 0 and tokens 0..k-1 per row (the tokenizer's positions), so a left-padded
    row generates what it would alone; the original counted the pads too."""
    model = build("prefix")
    ids, mask = padded["input_ids"], padded["attention_mask"]
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    per_row = (mask.cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(generated, greedy_loop(model, ids, mask, per_row, steps=4))
    unpadded = torch.ones_like(ids[:1])
    alone = model.generate(input_ids=ids[:1], attention_mask=unpadded, max_new_tokens=4, do_sample=False)
    assert torch.equal(alone, greedy_loop(model, ids[:1], unpadded, torch.arange(ids.shape[1])[None], steps=4))


@pytest.mark.parametrize("variant", [None, "prefix"])
def test_beam_search(build, padded, variant):
    model = build(variant)
    greedy = model.generate(**prompt(padded), max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**prompt(padded), max_new_tokens=5, do_sample=False, num_beams=1), greedy)
    # 3 beams: the cache is reordered between steps; without a cache nothing needs reordering
    beams = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
    cached = model.generate(**prompt(padded), **beams)
    uncached = model.generate(**prompt(padded), **beams, use_cache=False)
    assert cached.shape == (6, padded["input_ids"].shape[1] + 5)
    assert torch.equal(cached, uncached)


def test_sampling_is_reproducible(build, padded):
    model = build("prefix")
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(**prompt(padded), max_new_tokens=5, do_sample=True, top_p=0.8, temperature=0.8))
    assert torch.equal(runs[0], runs[1])


def test_past_key_values_is_an_alias_of_cache(build, padded):
    model = build("prefix")
    ids, mask, pos = prompt(padded).values()
    with_cache, with_alias = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad(), pytest.warns(FutureWarning, match="past_key_values"):
        a = model(ids, attention_mask=mask, position_ids=pos, cache=with_cache).logits
        b = model(ids, attention_mask=mask, position_ids=pos, past_key_values=with_alias).logits
    assert torch.equal(a, b) and with_alias.get_seq_length() == ids.shape[1]
    with pytest.raises(TypeError, match="legacy tuple"):
        model(ids, cache=tuple((k, v) for k, v, _ in with_cache))


# ---- P-tuning ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["prefix", "projection"])
def test_only_the_prefix_trains(build, padded, variant):
    model = build(variant).train()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    model(**padded).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("variant", ["prefix", "projection"])
def test_gradient_checkpointing_gives_the_same_prefix_grads(build, padded, variant):
    def prefix_grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = build(variant)
        if checkpointing:
            model.gradient_checkpointing_enable()  # non-reentrant by default
        model.train()  # prefix dropout active: the same seed gives the same masks in both runs
        calls = []  # a pre-hook: the recompute stops early, inside the block's last module
        model.transformer.encoder.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(0)
        model(**padded).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = prefix_grads(False)
    checkpointed, checkpointed_calls = prefix_grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the block really was recomputed in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-7, rtol=1e-5)


def test_prefix_dropout_only_in_training(build, padded):
    model = build("prefix")
    with torch.no_grad():
        first, second = model(**prompt(padded)).logits, model(**prompt(padded)).logits
        assert torch.equal(first, second)
        model.train()
        torch.manual_seed(1)
        dropped = model(**prompt(padded)).logits
    assert not torch.allclose(dropped, first)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(build, golden, padded, dtype):
    model = build("prefix").to(dtype)
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32  # kept fp32 to train
    with torch.no_grad():
        out = model(**padded)
    assert out.logits.dtype == dtype and out.loss.dtype == dtype
    assert torch.isfinite(out.logits).all()
    # half-precision rounding only: far below the logits' spread (|logits| up to ~4)
    assert (out.logits.float() - golden["prefix.padded.logits"]).abs().max() < 0.3
    generated = model.generate(**prompt(padded), max_new_tokens=3, do_sample=False)
    assert generated.shape == (3, padded["input_ids"].shape[1] + 3)
