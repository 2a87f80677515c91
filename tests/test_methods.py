"""Every tuning method (--method) on a tiny model of each family: parameter counts against the
formulas, where the virtual tokens sit (positions, masks, labels, outputs, cached generation),
checkpoint round trips and mix-ups, LoRA merging, and end-to-end CLI training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from official_layout import REPO_ROOT, random_official_state, tiny_config, tokenizers_dir
from safetensors.torch import load_file

from chatglm_ptuning import load_model
from chatglm_ptuning.arguments import DataTrainingArguments
from chatglm_ptuning.checkpoint import CheckpointError, PromptSettings, save_prefix_checkpoint
from chatglm_ptuning.data import build_preprocess_function
from chatglm_ptuning.export_merged import export_merged
from chatglm_ptuning.lora import LoraOptions, merge_lora
from chatglm_ptuning.checkpoint import PromptSettings
from chatglm_ptuning.methods import MethodError
from chatglm_ptuning.official_format import write_official_folder
from chatglm_ptuning.train import main

ADGEN_TRAIN = str(REPO_ROOT / "data_samples" / "adgen_train.json")
P = 4  # virtual tokens in every test
GLM1_IDS = [5, 74874, 100, 130001, 130004, 5, 200]  # context, [gMASK], <sop>, answer
GLM2_IDS = [64790, 64792, 790, 30951, 517, 30910, 30939]  # [gMASK], sop, prompt
SOFT = {  # method -> extra load_model settings
    "ptuning_v2": {},
    "ptuning_v2-projection": {"prefix_projection": True},
    "prefix_tuning": {"encoder_hidden_size": 24},
    "prompt_tuning": {},
    "ptuning-lstm": {"encoder_type": "lstm", "encoder_hidden_size": 20},
    "ptuning-mlp": {"encoder_type": "mlp", "encoder_hidden_size": 24},
}


@pytest.fixture(scope="module")
def tiny_glm1_sharp_dir(tmp_path_factory, shared_tokenizers) -> Path:
    """A tiny ChatGLM-6B folder whose attention and MLP output weights are 5x the usual tiny scale.

    At the usual scale ChatGLM-6B's residual (sqrt(2*28) times the normalized input) swamps the
    attention branch, and attention is almost uniform, so input-level virtual tokens (normalized by
    the first LayerNorm like any token) can move the loss by only ~0.01: too little to test
    learning. Sharper weights give every method a measurable signal.
    """
    folder = tmp_path_factory.mktemp("tiny-chatglm6b-sharp")
    config = tiny_config("chatglm")
    state = random_official_state(config, seed=1)
    for key in state:
        if (".attention." in key and key.endswith("weight")) or "dense_4h_to_h.weight" in key:
            state[key] = state[key] * 5
    write_official_folder(config, state, folder)
    for item in (tokenizers_dir() / "chatglm-6b").iterdir():
        shutil.copy(item, folder / item.name)
    return folder


@pytest.fixture
def model_dirs(tiny_glm1_sharp_dir, tiny_glm2_dir) -> dict[str, Path]:
    return {"chatglm": tiny_glm1_sharp_dir, "chatglm2": tiny_glm2_dir}


def _method(name: str) -> str:
    return name.split("-")[0]


# ---- parameter counts ---------------------------------------------------------------------------


def _lstm_params(input_size: int, hidden: int) -> int:
    """One direction of one LSTM layer: 4 gates, input and hidden weights, two biases."""
    return 4 * hidden * (input_size + hidden) + 2 * 4 * hidden


def expected_trainable(arch: str, name: str, kwargs: dict) -> int:
    """The formulas, from the tiny configs (H hidden, L layers, K = L * 2 * kv heads * head dim)."""
    c = tiny_config(arch)
    H, L = c.hidden_size, c.num_layers
    K = c.prefix_kv_size
    assert K == (L * 2 * 4 * 8 if arch == "chatglm" else L * 2 * 2 * 8)  # 4 heads / 2 groups of dim 8
    method = _method(name)
    h = kwargs.get("encoder_hidden_size")
    if method == "ptuning_v2" and not kwargs.get("prefix_projection"):
        return P * K
    if method == "ptuning_v2":  # ChatGLM-6B embeds in H, ChatGLM2/3 in K (the official shapes)
        E = H if arch == "chatglm" else K
        return P * E + (E * H + H) + (H * K + K)
    if method == "prefix_tuning":
        return P * H + (H * h + h) + (h * K + K)
    if method == "prompt_tuning":
        return P * H
    if kwargs["encoder_type"] == "mlp":
        return P * H + (H * h + h) + (h * H + H)
    lstm = 2 * (_lstm_params(H, h // 2) + _lstm_params(h, h // 2))  # 2 directions, 2 layers
    return P * H + lstm + (h * h + h) + (h * H + H)


@pytest.mark.parametrize("arch", ["chatglm", "chatglm2"])
@pytest.mark.parametrize("name", list(SOFT))
def test_soft_prompt_parameter_counts_match_the_formulas(model_dirs, arch, name):
    model, _ = load_model(model_dirs[arch], method=_method(name), pre_seq_len=P, device="cpu", **SOFT[name])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    prefix = "transformer.prefix_encoder." if _method(name) in ("ptuning_v2", "prefix_tuning") else "transformer.prompt_encoder."
    assert trainable and all(n.startswith(prefix) for n in trainable), sorted(trainable)
    assert sum(p.numel() for p in trainable.values()) == expected_trainable(arch, name, SOFT[name])
    assert all(p.dtype == torch.float32 for p in trainable.values())


@pytest.mark.parametrize("arch", ["chatglm", "chatglm2"])
@pytest.mark.parametrize("targets", [("query_key_value",), ("query_key_value", "dense")])
def test_lora_and_full_parameter_counts_match_the_formulas(model_dirs, arch, targets):
    c = tiny_config(arch)
    H, L, r = c.hidden_size, c.num_layers, 4
    qkv_out = 3 * H if arch == "chatglm" else (c.num_attention_heads + 2 * c.multi_query_group_num) * c.kv_channels
    per_layer = r * (H + qkv_out) + (r * (H + H) if "dense" in targets else 0)  # r * (in + out) per adapted linear
    model, _ = load_model(model_dirs[arch], method="lora", lora_options=LoraOptions(rank=r, target_modules=targets), device="cpu")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(trainable.values()) == L * per_layer

    full, _ = load_model(model_dirs[arch], method="full", device="cpu")
    shapes = random_official_state(c)  # the official tensors; ChatGLM-6B's lm_head is tied (counted once)
    official = sum(t.numel() for k, t in shapes.items() if not k.endswith("inv_freq") and k != "lm_head.weight")
    assert sum(p.numel() for p in full.parameters() if p.requires_grad) == official


# ---- where the virtual tokens sit ---------------------------------------------------------------


def _capture_first_layer(model, arch: str) -> dict:
    """Hooks that record the first layer's mask and the positions of one forward."""
    seen: dict = {}
    inner = model.transformer
    if arch == "chatglm":
        def hook(module, args, kwargs):  # noqa: ANN001
            seen.setdefault("positions", []).append(args[1])
            seen.setdefault("mask", []).append(args[2])
        inner.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    else:
        inner.rotary_pos_emb.register_forward_pre_hook(lambda m, args: seen.setdefault("positions", []).append(args[0]))

        def hook(module, args, kwargs):  # noqa: ANN001
            seen.setdefault("mask", []).append(kwargs["attention_mask"])
        inner.encoder.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_glm1_virtual_tokens_sit_in_the_bidirectional_context(tiny_glm1_sharp_dir):
    model, _ = load_model(tiny_glm1_sharp_dir, method="prompt_tuning", pre_seq_len=P, device="cpu")
    seen = _capture_first_layer(model, "chatglm")
    ids = torch.tensor([GLM1_IDS])  # context 3 tokens, [gMASK] at 3, <sop> at 4
    model(ids)
    positions, blocked = seen["positions"][0][0], seen["mask"][0][0, 0]
    # row 0: virtual 0..3, context 4..6, [gMASK] 7, then the mask position from <sop> on; row 1: block positions
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7], [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3]]
    context = P + 4  # virtual tokens, 3 context tokens and [gMASK]: everything before <sop>
    assert not blocked[:, :context].any()  # every token sees the whole context, virtual tokens included
    assert not blocked[:context, :context].any()  # ...and the context (virtual tokens too) sees itself both ways
    assert blocked[context:, context:].equal(~torch.ones(3, 3, dtype=torch.bool).tril())  # causal from <sop> on
    assert blocked[:context, context:].all()


def test_glm2_virtual_tokens_come_first_with_their_own_positions(tiny_glm2_dir):
    model, _ = load_model(tiny_glm2_dir, method="ptuning", pre_seq_len=P, encoder_type="mlp", device="cpu")
    seen = _capture_first_layer(model, "chatglm2")
    ids = torch.tensor([[0, 0] + GLM2_IDS])  # left padded as the tokenizer does
    mask = torch.tensor([[0, 0] + [1] * len(GLM2_IDS)])
    positions = torch.tensor([[0, 0] + list(range(len(GLM2_IDS)))])
    model(ids, attention_mask=mask, position_ids=positions)
    assert seen["positions"][0][0].tolist() == [0, 1, 2, 3] + [4, 4] + list(range(P, P + len(GLM2_IDS)))
    allowed = seen["mask"][0][0, 0]  # True = may attend
    real = [i for i in range(allowed.shape[0]) if i not in (P, P + 1)]
    sub = allowed[real][:, real]
    assert sub.equal(torch.ones_like(sub).tril())  # virtual tokens first, then causal over real tokens
    assert not allowed[real][:, [P, P + 1]].any()  # pads are never attended


@pytest.mark.parametrize("arch,name", [("chatglm", "prompt_tuning"), ("chatglm", "ptuning-lstm"),
                                       ("chatglm2", "prompt_tuning"), ("chatglm2", "ptuning-mlp")])
def test_virtual_tokens_never_reach_logits_labels_or_generated_ids(model_dirs, arch, name):
    model, _ = load_model(model_dirs[arch], method=_method(name), pre_seq_len=P, device="cpu", **SOFT[name])
    ids = torch.tensor([GLM1_IDS if arch == "chatglm" else GLM2_IDS])
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape[:2] == ids.shape  # one logit row per real token: no virtual rows
    manual = F.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)  # the loss is over the caller's labels only

    generated = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert generated.shape == (1, ids.shape[1] + 6) and generated[:, : ids.shape[1]].equal(ids)
    # cached decoding continues with the right positions: it equals recomputing the whole sequence
    sequence = ids
    for _ in range(6):
        with torch.no_grad():
            next_id = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat((sequence, next_id), dim=-1)
    assert generated.equal(sequence)
    # the prompt matters: without it the model generates from other hidden states
    base, _ = load_model(model_dirs[arch], device="cpu")
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, out.logits, atol=1e-4)


@pytest.mark.parametrize("arch", ["chatglm", "chatglm2"])
def test_virtual_token_rows_generate_the_same_alone_or_left_padded(model_dirs, arch):
    model, tokenizer = load_model(model_dirs[arch], method="prompt_tuning", pre_seq_len=P, device="cpu")
    prompts = ["类型#裙*颜色#红色", "类型#上衣*材质#棉*风格#简约*图案#条纹"]
    alone = [model.generate(**tokenizer([p], return_tensors="pt"), max_new_tokens=5, do_sample=False, eos_token_id=None)
             for p in prompts]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    together = model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None)
    for row, single in zip(together, alone):
        assert row[-5:].equal(single[0, -5:])


# ---- checkpoints --------------------------------------------------------------------------------


def _soft_checkpoint(model_dir: Path, folder: Path, method: str, **kwargs) -> Path:
    model, _ = load_model(model_dir, method=method, pre_seq_len=P, device="cpu", **kwargs)
    return save_prefix_checkpoint(model.prefix_state_dict(), folder, PromptSettings.from_config(model.config, method))


def _lora_checkpoint(model_dir: Path, folder: Path) -> Path:
    model, _ = load_model(model_dir, method="lora", lora_options=LoraOptions(rank=4), device="cpu")
    with torch.no_grad():  # B starts at zero; a random one makes the adapter change the outputs
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    PromptSettings(model.config.architecture, method="lora").save(folder)
    return folder


def test_checkpoint_of_one_method_loaded_as_another_is_a_clear_error(tmp_path, tiny_glm2_dir):
    prompt = _soft_checkpoint(tiny_glm2_dir, tmp_path / "prompt", "prompt_tuning")
    lora = _lora_checkpoint(tiny_glm2_dir, tmp_path / "lora")
    prefix = _soft_checkpoint(tiny_glm2_dir, tmp_path / "prefix", "ptuning_v2")
    with pytest.raises(CheckpointError, match="holds a prompt_tuning checkpoint; it cannot be loaded as ptuning"):
        load_model(tiny_glm2_dir, ptuning_checkpoint=prompt, method="ptuning", device="cpu")
    with pytest.raises(CheckpointError, match="holds a lora checkpoint; it cannot be loaded as ptuning_v2"):
        load_model(tiny_glm2_dir, ptuning_checkpoint=lora, method="ptuning_v2", device="cpu")
    with pytest.raises(CheckpointError, match="holds a ptuning_v2 checkpoint; it cannot be loaded as lora"):
        load_model(tiny_glm2_dir, ptuning_checkpoint=prefix, method="lora", device="cpu")
    with pytest.raises(CheckpointError, match="has encoder_type lstm but encoder_type mlp"):
        load_model(tiny_glm2_dir, ptuning_checkpoint=_soft_checkpoint(tiny_glm2_dir, tmp_path / "pt", "ptuning"),
                   encoder_type="mlp", device="cpu")
    with pytest.raises(MethodError, match="apply to the soft-prompt methods"):
        load_model(tiny_glm2_dir, method="lora", pre_seq_len=P, device="cpu")
    with pytest.raises(MethodError, match="needs pre_seq_len"):
        load_model(tiny_glm2_dir, method="prompt_tuning", device="cpu")


@pytest.mark.parametrize("name", ["prefix_tuning", "prompt_tuning", "ptuning-lstm"])
def test_soft_prompt_checkpoint_restores_the_same_model(tmp_path, tiny_glm2_dir, name):
    folder = _soft_checkpoint(tiny_glm2_dir, tmp_path / "c", _method(name), **SOFT[name])
    saved = json.loads((folder / "ptuning_config.json").read_text())
    assert saved["method"] == _method(name) and saved["pre_seq_len"] == P
    first, _ = load_model(tiny_glm2_dir, ptuning_checkpoint=folder, device="cpu")
    again, _ = load_model(tiny_glm2_dir, ptuning_checkpoint=folder, method=_method(name), device="cpu")
    ids = torch.tensor([GLM2_IDS])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, again(ids).logits)
    stored = load_file(folder / "model.safetensors")
    assert all(torch.equal(first.state_dict()[k], v) for k, v in stored.items())


def test_settings_files_written_before_methods_existed_read_as_ptuning_v2(tmp_path, tiny_glm2_dir):
    folder = _soft_checkpoint(tiny_glm2_dir, tmp_path / "old", "ptuning_v2")
    old = {"architecture": "chatglm2", "pre_seq_len": P, "prefix_projection": False, "base_model": None,
           "family": None, "quantization_bit": 0}
    (folder / "ptuning_config.json").write_text(json.dumps(old))
    model, _ = load_model(tiny_glm2_dir, ptuning_checkpoint=folder, device="cpu")
    assert model.config.prompt_method == "ptuning_v2" and model.config.pre_seq_len == P


@pytest.mark.parametrize("arch", ["chatglm", "chatglm2"])
def test_lora_checkpoint_reloads_and_merges_into_the_official_layout(tmp_path, model_dirs, arch):
    model_dir = model_dirs[arch]
    folder = _lora_checkpoint(model_dir, tmp_path / "lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "ptuning_config.json"} <= {p.name for p in folder.iterdir()}
    ids = torch.tensor([GLM1_IDS if arch == "chatglm" else GLM2_IDS])
    adapted, _ = load_model(model_dir, ptuning_checkpoint=folder, device="cpu", dtype=torch.float32)
    base, _ = load_model(model_dir, device="cpu", dtype=torch.float32)
    merged_dir = export_merged(model_dir, folder, tmp_path / "merged", dtype="float32")
    assert (merged_dir / "pytorch_model.bin").is_file()
    assert "pre_seq_len" not in json.loads((merged_dir / "config.json").read_text())
    merged, _ = load_model(merged_dir, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        expected = adapted(ids).logits
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-4)
    with pytest.raises(CheckpointError, match="only LoRA adapters merge"):
        export_merged(model_dir, _soft_checkpoint(model_dir, tmp_path / "soft", "prompt_tuning"), tmp_path / "x")


def test_lora_on_a_quantized_backbone_runs_and_refuses_to_merge(tmp_path, tiny_glm2_dir):
    folder = _lora_checkpoint(tiny_glm2_dir, tmp_path / "lora")
    for bits in (8, 4):
        model, _ = load_model(tiny_glm2_dir, ptuning_checkpoint=folder, quantization_bit=bits, device="cpu")
        ids = torch.tensor([GLM2_IDS])
        out = model(ids, labels=ids)
        out.loss.backward()  # gradients reach the adapters through the quantized base layer
        grads = [p.grad for n, p in model.named_parameters() if ".lora_A." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        with pytest.raises(ValueError, match="cannot be merged into an INT8/INT4 backbone"):
            merge_lora(model)


# ---- end to end through the training CLI ---------------------------------------------------------

CLI_CASES = [
    # (family, method name, extra flags, learning rate)
    ("chatglm2", "ptuning_v2", ["--pre_seq_len", "4"], "0.3"),
    ("chatglm2", "prefix_tuning", ["--pre_seq_len", "4", "--encoder_hidden_size", "24"], "0.01"),
    ("chatglm2", "prompt_tuning", ["--pre_seq_len", "4"], "0.1"),
    ("chatglm2", "ptuning", ["--pre_seq_len", "4", "--encoder_type", "lstm"], "0.03"),
    ("chatglm2", "lora", ["--lora_rank", "4"], "0.01"),
    ("chatglm2", "full", [], "0.001"),
    ("chatglm", "ptuning_v2", ["--pre_seq_len", "4", "--prefix_projection"], "0.03"),
    ("chatglm", "prefix_tuning", ["--pre_seq_len", "4"], "0.01"),
    ("chatglm", "prompt_tuning", ["--pre_seq_len", "4"], "0.1"),
    ("chatglm", "ptuning", ["--pre_seq_len", "4", "--encoder_type", "mlp"], "0.03"),
    ("chatglm", "lora", ["--lora_rank", "4"], "0.01"),
    ("chatglm", "full", [], "0.001"),
    ("chatglm2", "prompt_tuning", ["--pre_seq_len", "4", "--quantization_bit", "4"], "0.1"),
    ("chatglm", "lora", ["--lora_rank", "4", "--quantization_bit", "8"], "0.01"),
]


def _ids(case) -> str:
    family, name, extra, _ = case
    bits = [e for e in extra if e in ("4", "8")] if "--quantization_bit" in extra else []
    return f"{family}-{name}" + (f"-int{bits[-1]}" if bits else "")


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_CASES, ids=[_ids(c) for c in CLI_CASES])
def test_each_method_trains_saves_reloads_and_generates(tmp_path, model_dirs, case):
    family, method, extra, lr = case
    model_dir, out = model_dirs[family], tmp_path / "out"
    steps = 8
    code = main([
        "--do_train", "--train_file", ADGEN_TRAIN, "--prompt_column", "content", "--response_column", "summary",
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--overwrite_output_dir",
        "--max_source_length", "24", "--max_target_length", "24", "--per_device_train_batch_size", "2",
        "--max_train_samples", "2", "--max_steps", str(steps), "--logging_steps", "1", "--learning_rate", lr,
        "--report_to", "none", "--method", method, *extra,
    ])
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == steps
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses  # one batch seen 8 times: it is learnt

    checkpoint = out / f"checkpoint-{steps}"
    names = {p.name for p in checkpoint.iterdir()}
    quantization = ["--quantization_bit", extra[-1]] if "--quantization_bit" in extra else []
    bits = int(extra[-1]) if quantization else None
    if method == "full":
        assert "ptuning_config.json" not in names  # a whole model: it loads as the model itself...
        model, tokenizer = load_model(checkpoint, device="cpu")
        on_base, _ = load_model(model_dir, ptuning_checkpoint=checkpoint, method="full", device="cpu")  # ...or on its base
        ids = torch.tensor([GLM1_IDS if family == "chatglm" else GLM2_IDS])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, on_base(ids).logits)
    else:
        settings = json.loads((checkpoint / "ptuning_config.json").read_text())
        assert settings["method"] == method and settings["architecture"] == family
        if method == "lora":
            assert {"adapter_config.json", "adapter_model.safetensors"} <= names
            saved = load_file(checkpoint / "adapter_model.safetensors")
            assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
        else:
            saved = load_file(checkpoint / "model.safetensors")
            assert saved and all(k.startswith(("transformer.prefix_encoder.", "transformer.prompt_encoder.")) for k in saved)
            assert not any(n.startswith("pytorch_model") for n in names)
        model, tokenizer = load_model(model_dir, ptuning_checkpoint=checkpoint, quantization_bit=bits, device="cpu")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert sum(t.numel() for t in saved.values()) == trainable  # only the trainable weights were saved

    # the reloaded model carries what was learnt: its loss on the training rows is below the first one
    rows = [json.loads(line) for line in Path(ADGEN_TRAIN).read_text(encoding="utf-8").splitlines()[:2]]
    data_args = DataTrainingArguments(train_file=ADGEN_TRAIN, prompt_column="content", response_column="summary",
                                      max_source_length=24, max_target_length=24, pad_to_max_length=True)
    batch = build_preprocess_function(tokenizer, data_args, train=True)(
        {"content": [r["content"] for r in rows], "summary": [r["summary"] for r in rows]})
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(batch["input_ids"]), labels=torch.tensor(batch["labels"])).loss.item()
    assert loss < losses[0] - 0.03, (loss, losses)

    prompt = tokenizer(["类型#裙*颜色#红色"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
    n = prompt["input_ids"].shape[1]
    assert generated.shape == (1, n + 4) and generated[:, :n].equal(prompt["input_ids"])
    response, history = model.chat(tokenizer, "你好", history=[], do_sample=False, max_new_tokens=4)
    assert isinstance(response, str) and len(history) == 1


def test_cli_method_misuse_is_one_clear_error_line(tmp_path, tiny_glm2_dir, capsys):
    common = ["--do_train", "--train_file", ADGEN_TRAIN, "--prompt_column", "content", "--response_column", "summary",
              "--model_name_or_path", str(tiny_glm2_dir), "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
              "--report_to", "none"]
    for extra, message in [
        (["--method", "prompt_tuning"], "needs pre_seq_len"),
        (["--method", "lora", "--pre_seq_len", "4"], "apply to the soft-prompt methods"),
        (["--method", "full", "--quantization_bit", "4"], "needs a dense backbone"),
        (["--method", "prompt_tuning", "--pre_seq_len", "4", "--prefix_projection"], "prefix_projection applies to ptuning_v2"),
    ]:
        assert main([*common, *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


@pytest.mark.slow
def test_compare_methods_writes_the_table_the_json_and_the_curves(tmp_path, tiny_glm2_dir):
    import subprocess
    import sys

    out = tmp_path / "compare"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "compare_methods.py"), "--model_name_or_path", str(tiny_glm2_dir),
         "--methods", "prompt_tuning,lora", "--max_steps", "2", "--logging_steps", "1", "--max_eval_samples", "2",
         "--max_source_length", "16", "--max_target_length", "8", "--pre_seq_len", "4", "--output_dir", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "methods.json").read_text())["results"]
    assert [r["method"] for r in results] == ["prompt_tuning", "lora"]
    for row in results:
        assert {"trainable_parameters", "trainable_share", "peak_memory_mib", "step_time_s", "final_train_loss",
                "rouge-1", "rouge-2", "rouge-l", "bleu-4"} <= set(row)
        assert len(row["loss_curve"]) == 2 and row["peak_memory_mib"] > 0 and row["step_time_s"] > 0
    assert results[0]["trainable_parameters"] == P * tiny_config("chatglm2").hidden_size
    table = (out / "methods.md").read_text()
    assert "| prompt_tuning | 128 |" in table and "| lora |" in table
    assert (out / "loss_curves.png").stat().st_size > 1000


def test_the_method_registry_is_what_flags_settings_and_encoders_read():
    from chatglm_ptuning import checkpoint, prompt_learning
    from chatglm_ptuning.arguments import ModelArguments

    registry = prompt_learning.METHOD_REGISTRY
    assert checkpoint.METHODS == prompt_learning.METHODS == tuple(registry)
    assert {m.kind for m in registry.values()} == {"kv_prefix", "input_prompt", "lora", "full"}
    assert prompt_learning.SOFT_PROMPT_METHODS == tuple(n for n, m in registry.items() if m.kind in ("kv_prefix", "input_prompt"))
    choices = ModelArguments.__dataclass_fields__["method"].metadata["choices"]
    assert tuple(choices) == tuple(registry)
