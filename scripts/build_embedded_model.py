"""Build the embedded default model, `chatglm_ptuning/embedded/`: what `train.sh` tunes without MODEL_PATH.

It is a tiny ChatGLM2-architecture causal LM with a SentencePiece tokenizer of its own, both made
here from the project's own sample text (data_samples/, training files only), deterministically:

1. Tokenizer: SentencePiece BPE trained with the ChatGLM2 `tokenizer.model` conventions (identity
   normalizer, byte fallback, split digits, dummy prefix, whitespace kept; unk 0, bos 1, eos 2, no
   separate pad piece), on every text of the training files (ADGEN attribute lists and ad copy,
   chat questions and answers). `ChatGLM2Tokenizer` appends [MASK] [gMASK] [sMASK] sop eop after it.
2. Backbone: a ChatGLM2 model pre-trained as a plain causal LM on documents `[gMASK] sop text eos`,
   where a text is one ad copy or one chat utterance on its own. The attribute-list -> ad-copy
   mapping is never shown, so a P-tuning prefix has a real task to learn on top of it.
3. Weights are written fp16 in the official layout (config.json + model.safetensors), with
   tokenizer.model and tokenizer_config.json beside them.

    python scripts/build_embedded_model.py                 # rebuild chatglm_ptuning/embedded/
    python scripts/build_embedded_model.py --out /tmp/emb  # build elsewhere

Rebuilding with the same torch/sentencepiece versions and thread count gives the same files.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from chatglm_ptuning import ChatGLM2Config, ChatGLM2ForConditionalGeneration  # noqa: E402
from chatglm_ptuning.data import read_json_records  # noqa: E402
from chatglm_ptuning.loading import load_tokenizer  # noqa: E402
from chatglm_ptuning.official_format import write_official_folder  # noqa: E402
from chatglm_ptuning.tokenization import GLM2_VOCAB_FILE, ChatGLM2Tokenizer  # noqa: E402

NAME_OR_PATH = "chatglm-ptuning/embedded-tiny-chatglm2"
DEFAULT_OUT = REPO_ROOT / "chatglm_ptuning" / "embedded"
DATA_DIR = REPO_ROOT / "data_samples"
SEED = 20240611

TOKENIZER_VOCAB = 3000  # SentencePiece pieces (bytes and unk/bos/eos included)
MAX_PIECE_CHARS = 4  # the corpus is small and templated: longer pieces would be whole clauses

# The backbone (field comments: what the value is for this model, not the field's meaning).
BACKBONE = dict(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=4,
    kv_channels=32,  # head dim
    multi_query_attention=True,
    multi_query_group_num=2,  # 2 key/value heads: the prefix has 2 * 32 values per layer and position
    ffn_hidden_size=344,  # ~ 8/3 * hidden, as ChatGLM2's 13696 is to 4096 (~3.3x)
    seq_length=512,
    add_qkv_bias=True,
    layernorm_epsilon=1e-5,
)

# Pre-training of the backbone (plain causal LM on the sample text).
EPOCHS = 12
BATCH_SIZE = 16
LEARNING_RATE = 3e-3
WARMUP_STEPS = 50
WEIGHT_DECAY = 0.1
PRETRAIN_DROPOUT = 0.1  # the corpus is ~22k tokens: without dropout the backbone memorises it within ~10 epochs


def _rows(name: str) -> list[dict]:
    return [row for _, row in read_json_records(DATA_DIR / name)]


def _unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t and t.strip()))


def chat_utterances(rows: Sequence[dict]) -> list[str]:
    """Every question and answer of chat rows (history included), each once, in file order."""
    texts = []
    for row in rows:
        for query, answer in row.get("history") or []:
            texts += [query, answer]
        texts += [row["prompt"], row["response"]]
    return _unique(texts)


def tokenizer_texts() -> list[str]:
    """Text the tokenizer learns from: all of the training files, attribute lists included."""
    adgen = _rows("adgen_train.json")
    return _unique([row["content"] for row in adgen] + [row["summary"] for row in adgen] + chat_utterances(_rows("chat_train.json")))


def pretraining_documents() -> list[str]:
    """Documents the backbone learns from: ad copy and chat utterances, each on its own."""
    return _unique([row["summary"] for row in _rows("adgen_train.json")] + chat_utterances(_rows("chat_train.json")))


def heldout_documents() -> list[str]:
    """Ad copy of the dev file: never trained on, used to report the backbone's held-out loss."""
    return _unique(row["summary"] for row in _rows("adgen_dev.json"))


def train_sentencepiece(texts: Sequence[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model with the trainer/normalizer settings of ChatGLM2's tokenizer.model.

    SentencePiece reads one sentence per line, so texts are split at newlines; like in ChatGLM2's
    vocabulary, a newline then has no piece of its own and encodes through byte fallback (<0x0A>).
    """
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,  # every character of the sample text gets a piece (the rest: bytes)
        byte_fallback=True,
        split_digits=True,
        split_by_number=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=MAX_PIECE_CHARS,
        max_sentence_length=4192,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        shuffle_input_sentence=False,
        num_threads=1,  # one thread: the merges do not depend on scheduling
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer(folder: Path, model_bytes: bytes) -> ChatGLM2Tokenizer:
    """tokenizer.model and an official-style tokenizer_config.json; returns the tokenizer loaded back."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GLM2_VOCAB_FILE).write_bytes(model_bytes)
    config = {
        "name_or_path": NAME_OR_PATH,
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(folder)
    if not isinstance(tokenizer, ChatGLM2Tokenizer) or tokenizer.chatglm_version != 2:
        raise RuntimeError(f"{folder} loads as {type(tokenizer).__name__}, expected ChatGLM2Tokenizer")
    return tokenizer


def backbone_config(tokenizer: ChatGLM2Tokenizer) -> ChatGLM2Config:
    """The backbone config: embedding rows = the tokenizer's ids (pieces + 5 specials), rounded up to 64."""
    return ChatGLM2Config(padded_vocab_size=64 * math.ceil(tokenizer.vocab_size / 64), **BACKBONE)


def encode_documents(tokenizer: ChatGLM2Tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """`[gMASK, sop] + text + [eos]` per text, cut to `max_length` ids."""
    return [(tokenizer.encode(text) + [tokenizer.eos_token_id])[:max_length] for text in texts]


def _batch(documents: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [b, s] and labels [b, s]: -100 on padding and on `sop`, which always follows `[gMASK]`."""
    length = max(len(doc) for doc in documents)
    input_ids = torch.zeros(len(documents), length, dtype=torch.long)
    labels = torch.full((len(documents), length), -100, dtype=torch.long)
    for row, doc in enumerate(documents):
        input_ids[row, : len(doc)] = torch.tensor(doc)
        labels[row, 2 : len(doc)] = torch.tensor(doc[2:])
    return input_ids, labels


@torch.no_grad()
def mean_loss(model: ChatGLM2ForConditionalGeneration, documents: Sequence[list[int]], batch_size: int) -> float:
    """Token-weighted mean next-token loss over `documents`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(documents), batch_size):
        input_ids, labels = _batch(documents[start : start + batch_size])
        tokens = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=input_ids, labels=labels).loss) * tokens
        count += tokens
    return total / count


def pretrain(
    model: ChatGLM2ForConditionalGeneration,
    documents: Sequence[list[int]],
    heldout: Sequence[list[int]],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> list[dict[str, float]]:
    """AdamW with linear warm-up and cosine decay; one log row per epoch (train and held-out loss)."""
    order = random.Random(seed)
    steps_per_epoch = math.ceil(len(documents) / batch_size)
    total_steps = epochs * steps_per_epoch
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
        betas=(0.9, 0.95),
    )

    def schedule(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    log = []
    started = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        shuffled = list(documents)
        order.shuffle(shuffled)
        losses = []
        for start in range(0, len(shuffled), batch_size):
            input_ids, labels = _batch(shuffled[start : start + batch_size])
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        row = {
            "epoch": epoch,
            "train_loss": sum(losses) / len(losses),
            "heldout_loss": mean_loss(model, heldout, batch_size),
            "seconds": time.time() - started,
        }
        log.append(row)
        print(
            f"epoch {epoch:3d}  train loss {row['train_loss']:.3f}  held-out loss {row['heldout_loss']:.3f}  "
            f"{row['seconds']:.0f}s",
            flush=True,
        )
    return log


def build(out: Path, epochs: int, batch_size: int, learning_rate: float, seed: int) -> dict:
    """Write the whole embedded folder to `out`; returns a summary of the build."""
    started, cpu_started = time.time(), time.process_time()
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(out, train_sentencepiece(tokenizer_texts(), TOKENIZER_VOCAB))
    config = backbone_config(tokenizer)
    config.hidden_dropout = PRETRAIN_DROPOUT
    model = ChatGLM2ForConditionalGeneration(config)
    documents = encode_documents(tokenizer, pretraining_documents(), config.seq_length)
    heldout = encode_documents(tokenizer, heldout_documents(), config.seq_length)
    initial = mean_loss(model, heldout, batch_size)
    log = pretrain(model, documents, heldout, epochs, batch_size, learning_rate, seed)
    config.hidden_dropout = 0.0  # shipped as in the official config: P-tuning runs the frozen backbone without dropout
    state = {key: tensor.half() for key, tensor in model.state_dict().items()}
    write_official_folder(config, state, out, fmt="safetensors", torch_dtype="float16", name_or_path=NAME_OR_PATH)
    return {
        "pieces": tokenizer.sp_model.vocab_size(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "documents": len(documents),
        "tokens_per_epoch": sum(len(d) for d in documents),
        "heldout_loss_before": initial,
        "final": log[-1],
        "folder_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        "wall_seconds": time.time() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: chatglm_ptuning/embedded)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument("--learning_rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    summary = build(args.out, args.epochs, args.batch_size, args.learning_rate, args.seed)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
