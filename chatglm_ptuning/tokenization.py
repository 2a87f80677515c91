"""ChatGLM tokenizers: ChatGLM-6B (`ice_text.model`) and ChatGLM2-6B / ChatGLM3-6B (`tokenizer.model`).

Every official repository ships its own `tokenization_chatglm.py` whose class is called
`ChatGLMTokenizer`, and its `tokenizer_config.json` says `"tokenizer_class": "ChatGLMTokenizer"`.
`__init__.py` registers that name with `AutoTokenizer`; `ChatGLMTokenizer.from_pretrained` (what
`AutoTokenizer` calls) then picks the family from the folder:

- `ChatGLM6BTokenizer` when it holds `ice_text.model`;
- `ChatGLM3Tokenizer` when it holds `tokenizer.model` and says ChatGLM3: `chatglm_version=3` given by
  the caller, a saved `chatglm_version` field, or "chatglm3" in the `name_or_path` of
  tokenizer_config.json or the `_name_or_path` of config.json (the two model generations share one
  byte-identical SentencePiece file, so nothing else tells them apart);
- `ChatGLM2Tokenizer` otherwise.

Encoding, decoding and padding reproduce the official classes under the transformers releases they
were written for (4.27.1 for ChatGLM-6B, 4.30.2 for ChatGLM2/3): tests/golden/tokenizer_cases.json
holds ids and strings produced by the official code. Deliberate differences: ids beyond the
tokenizer's vocabulary (the model pads its embedding to 130528 / 65024 rows) decode to "" instead of
raising, and for ChatGLM3 `skip_special_tokens=True` also drops `[gMASK]`, `sop` and the role tokens.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import torch
from sentencepiece import SentencePieceProcessor
from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.utils import PaddingStrategy, cached_file

from .families import CHATGLM, CHATGLM2, CHATGLM3, CHATGLM3_ROLES
from .glm_positions import GLMMarks, glm_attention_mask, glm_position_ids

GLM1_VOCAB_FILE = "ice_text.model"
GLM2_VOCAB_FILE = "tokenizer.model"
TOKENIZER_CLASS_NAME = "ChatGLMTokenizer"  # what tokenizer_config.json says, for us and for the official remote code

# Keyword arguments of `from_pretrained` that locate files; used to read the folder before loading.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def split_around(text: str, tokens: list[str] | tuple[str, ...]) -> list[str]:
    """`text` cut around every occurrence of `tokens`; odd positions of the result hold the tokens."""
    pattern = "|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True))
    return re.split(f"({pattern})", text)


class ChatGLMTokenizer(PreTrainedTokenizer):
    """Base of the three ChatGLM tokenizer families; constructing or loading it returns a family.

    `ChatGLMTokenizer(vocab_file)` picks the family from the vocabulary file name (and the
    `chatglm_version` keyword for `tokenizer.model`); `ChatGLMTokenizer.from_pretrained(folder)` also
    reads the folder's configuration (see the module docstring).
    """

    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"
    chatglm_version: int = 0  # each family's `families.Family.version`
    # tokenizer_config.json keys the family rebuilds itself; dropped on save (see `save_pretrained`).
    _derived_config_keys: tuple[str, ...] = ("added_tokens_decoder",)

    def __new__(cls, *args: Any, **kwargs: Any) -> "ChatGLMTokenizer":
        if cls is ChatGLMTokenizer:
            vocab_file = kwargs.get("vocab_file", args[0] if args else None)
            if vocab_file is None:
                raise TypeError("ChatGLMTokenizer needs vocab_file (ice_text.model or tokenizer.model)")
            has_glm1 = os.path.basename(str(vocab_file)) == GLM1_VOCAB_FILE
            cls = _family_class(has_glm1=has_glm1, has_glm2=not has_glm1, version=kwargs.get("chatglm_version"))
        return super().__new__(cls)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *init_inputs: Any, **kwargs: Any):
        """Load a tokenizer folder; on `ChatGLMTokenizer` itself, return the folder's family.

        Extra keyword: `chatglm_version` (2 or 3) for `tokenizer.model` folders that do not say which.
        """
        family = cls
        if cls is ChatGLMTokenizer:
            family = _family_for_folder(str(pretrained_model_name_or_path), kwargs)
        return super(ChatGLMTokenizer, family).from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)

    def _init_version(self, chatglm_version: int | None) -> None:
        if chatglm_version is not None and int(chatglm_version) != self.chatglm_version:
            raise ValueError(
                f"{type(self).__name__} is the ChatGLM{self.chatglm_version} tokenizer but chatglm_version="
                f"{chatglm_version!r} was given; load the folder with ChatGLMTokenizer or AutoTokenizer "
                "to pick the family"
            )

    def _finish_init(self) -> None:
        """Call after `super().__init__`: record the family so a saved folder loads back the same way."""
        self.init_kwargs["chatglm_version"] = self.chatglm_version

    # ---- vocabulary -------------------------------------------------------------------------

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _add_tokens(self, new_tokens: list, special_tokens: bool = False) -> int:
        unknown = [str(token) for token in new_tokens if str(token) and str(token) not in self._vocab]
        if unknown:
            raise NotImplementedError(
                f"ChatGLM tokenizers cannot add tokens outside their SentencePiece vocabulary (the model embedding "
                f"is fixed): {unknown}"
            )
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Copy the SentencePiece model file (byte for byte) into `save_directory`."""
        name = self.vocab_files_names["vocab_file"]
        target = os.path.join(save_directory, f"{filename_prefix}-{name}" if filename_prefix else name)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            with open(self.vocab_file, "rb") as source, open(target, "wb") as sink:
                sink.write(source.read())
        return (target,)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """Save the vocabulary file and a tokenizer_config.json naming `ChatGLMTokenizer`.

        transformers writes the concrete class name (e.g. ChatGLM3Tokenizer); the official remote code and
        our Auto registration both know the name `ChatGLMTokenizer`, and `chatglm_version` picks the family.
        """
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = files[0]  # transformers returns tokenizer_config.json first
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
        config["tokenizer_class"] = TOKENIZER_CLASS_NAME
        for key in self._derived_config_keys + ("backend", "is_local", "local_files_only"):
            config.pop(key, None)
        with open(config_file, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files

    # ---- tokenizing -------------------------------------------------------------------------

    def _no_split_tokens(self) -> tuple[str, ...]:
        """Strings kept whole in text (with the whitespace around them stripped), as the original did."""
        return ()

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Split `text` into pieces.

        transformers 4.27/4.30 kept the *registered special tokens* of a tokenizer whole and stripped the
        whitespace on both sides of them; the official ChatGLM2/3 classes registered none (their special
        tokens were read-only properties), so their text goes to SentencePiece untouched.
        """
        text, _ = self.prepare_for_tokenization(text, **kwargs)
        specials = self._no_split_tokens()
        if not specials:
            return self._tokenize(text)
        chunks = split_around(text, specials)
        for i in range(1, len(chunks), 2):  # odd indices are the special tokens
            chunks[i - 1] = chunks[i - 1].rstrip()
            chunks[i + 1] = chunks[i + 1].lstrip()
        pieces: list[str] = []
        for i, chunk in enumerate(chunks):
            if i % 2:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self._tokenize(chunk))
        return pieces

    # ---- decoding ---------------------------------------------------------------------------

    def _ids_dropped_when_decoding(self, skip_special_tokens: bool) -> set[int]:
        return set(self.all_special_ids) if skip_special_tokens else set()

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        dropped = self._ids_dropped_when_decoding(skip_special_tokens)
        text = self.convert_tokens_to_string([self._convert_id_to_token(i) for i in ids if i not in dropped])
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ---- padding ----------------------------------------------------------------------------

    def _pad(
        self,
        encoded_inputs: dict[str, Any] | BatchEncoding,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """transformers' per-example padding hook: left-pad one example to its target length.

        The family's `_pad_left` adds its attention mask and positions; `return_attention_mask` is
        ignored, as in the originals.
        """
        side = padding_side or self.padding_side
        if side != "left":
            raise ValueError(
                f"{type(self).__name__} pads on the left only (the official tokenizer asserts it and the ChatGLM "
                f"masks/positions assume it); got padding_side={side!r}"
            )
        length = len(encoded_inputs[self.model_input_names[0]])
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        padding = max_length - length if padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None else 0
        return self._pad_left(encoded_inputs, max_length, padding)

    def _pad_left(self, encoded_inputs: dict[str, Any], max_length: int | None, padding: int) -> dict:
        """Add the family's mask and positions to one example, then put `padding` pads before it."""
        raise NotImplementedError


class ChatGLM6BTokenizer(ChatGLMTokenizer):
    """ChatGLM-6B tokenizer (`ice_text.model`, SentencePiece unigram with NFKC normalisation).

    Text preprocessing: `\\n` -> `<n>`, `\\t` -> `<|tab|>`, runs of 2..80 spaces -> `<|blank_k|>`.
    `num_image_tokens` shifts every id (the pre-2023-04-06 checkpoints reserved 20000 image ids, the
    class default; the official tokenizer_config says 0). Special tokens form a suffix:
    `ids + [gMASK, <sop>]`, and a pair is `a + [gMASK, <sop>] + b + [<eop>]`. Padding returns, per
    example, a bool block mask [1, s, s] (True = blocked) and 2D positions [2, s].
    """

    vocab_files_names = {"vocab_file": GLM1_VOCAB_FILE}
    chatglm_version = CHATGLM.version
    max_blank_length = 80

    def __init__(
        self,
        vocab_file: str,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        padding_side: str = "left",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = 20000,
        clean_up_tokenization_spaces: bool = True,  # the transformers 4.27 default the original relied on
        chatglm_version: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._init_version(chatglm_version)
        # transformers 5 turns unknown `*_token` config keys into extra special tokens; the original did not
        # treat [gMASK] or </s> as special, so keep them as plain attributes.
        named = kwargs.pop("model_specific_special_tokens", None) or {}
        self.end_token = str(named.pop("end_token", end_token))
        self.gmask_token = str(named.pop("gmask_token", gmask_token))
        if named:
            kwargs["model_specific_special_tokens"] = named
        self.vocab_file = vocab_file
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.num_image_tokens = num_image_tokens
        self.sp_model = SentencePieceProcessor(model_file=vocab_file)
        self._num_pieces = self.sp_model.vocab_size()
        self._vocab = {f"<image_{i}>": i for i in range(num_image_tokens)}
        self._vocab.update({self.sp_model.IdToPiece(i): i + num_image_tokens for i in range(self._num_pieces)})
        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            padding_side=padding_side,
            bos_token=bos_token,
            eos_token=eos_token,
            mask_token=mask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.init_kwargs.update(end_token=self.end_token, gmask_token=self.gmask_token)
        self._finish_init()

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self._num_pieces

    @property
    def gmask_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.gmask_token)

    @property
    def end_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.end_token)

    def build_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """The ChatGLM-6B chat prompt: the raw query without history, else rounds numbered from 0."""
        if not history:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："

    def _no_split_tokens(self) -> tuple[str, ...]:
        return tuple(str(t) for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token, self.mask_token))

    def _preprocess(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for length in range(self.max_blank_length, 1, -1):  # longest runs first
            text = text.replace(" " * length, f"<|blank_{length}|>")
        return text

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.EncodeAsPieces(self._preprocess(text))

    def _convert_token_to_id(self, token: str) -> int:
        image = re.fullmatch(r"<image_(\d+)>", token)
        if image:
            return int(image.group(1))
        return self.sp_model.PieceToId(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        piece = index - self.num_image_tokens
        return self.sp_model.IdToPiece(piece) if piece < self._num_pieces else ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text = self.sp_model.DecodePieces(tokens).replace("<n>", "\n").replace("<|tab|>", "\t")
        for length in range(2, self.max_blank_length + 1):
            text = text.replace(f"<|blank_{length}|>", " " * length)
        return text

    def _ids_dropped_when_decoding(self, skip_special_tokens: bool) -> set[int]:
        return {self.pad_token_id} | super()._ids_dropped_when_decoding(skip_special_tokens)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def _pad_left(self, encoded_inputs: dict[str, Any], max_length: int | None, padding: int) -> dict:
        """When a target length is known, add the GLM mask [1, s, s] and positions [2, s].

        Like the original, masks and positions are built on the unpadded ids (glm_positions.py, as the
        model derives them), then padded: the mask with True (blocked) on both dims, the positions with 0.
        """
        ids = encoded_inputs[self.model_input_names[0]]
        if max_length is not None:
            row = torch.tensor([ids], dtype=torch.long)  # [1, s]
            if "attention_mask" not in encoded_inputs:
                encoded_inputs["attention_mask"] = glm_attention_mask(row, self.bos_token_id)[0].numpy()  # [1, s, s]
            if "position_ids" not in encoded_inputs:
                marks = GLMMarks(self.bos_token_id, self.mask_token_id, self.gmask_token_id)
                encoded_inputs["position_ids"] = glm_position_ids(row, marks, mask_before_gmask=True)[0].numpy()  # [2, s]
        if padding:
            if "attention_mask" in encoded_inputs:
                encoded_inputs["attention_mask"] = np.pad(
                    encoded_inputs["attention_mask"], [(0, 0), (padding, 0), (padding, 0)], constant_values=True
                )
            if "token_type_ids" in encoded_inputs:
                encoded_inputs["token_type_ids"] = [self.pad_token_type_id] * padding + encoded_inputs[
                    "token_type_ids"
                ]
            if "special_tokens_mask" in encoded_inputs:
                encoded_inputs["special_tokens_mask"] = [1] * padding + encoded_inputs["special_tokens_mask"]
            if "position_ids" in encoded_inputs:
                encoded_inputs["position_ids"] = np.pad(encoded_inputs["position_ids"], [(0, 0), (padding, 0)])
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * padding + ids
        return encoded_inputs


class ChatGLM2Tokenizer(ChatGLMTokenizer):
    """ChatGLM2-6B tokenizer (`tokenizer.model`, SentencePiece BPE with byte fallback).

    `SPECIAL_TOKENS` take the ids right after the SentencePiece vocabulary (n_words, n_words + 1, ...: 64789..
    for the released model). bos 1, eos 2 (`</s>`),
    pad = unk = 0. Special tokens form a prefix: `[gMASK, sop] + ids`, and a pair is
    `[gMASK, sop] + a + b + [eos]`. Padding (left only) returns 1/0 attention masks and positions 0..n-1.
    """

    vocab_files_names = {"vocab_file": GLM2_VOCAB_FILE}
    chatglm_version = CHATGLM2.version
    SPECIAL_TOKENS: tuple[str, ...] = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
    # The official class hard-codes these (read-only properties, so its __init__ rejects them as keys).
    _derived_config_keys = ("bos_token", "eos_token", "unk_token", "pad_token", "added_tokens_decoder")

    def __init__(
        self,
        vocab_file: str,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        chatglm_version: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._init_version(chatglm_version)
        self.vocab_file = vocab_file
        self.sp_model = SentencePieceProcessor(model_file=vocab_file)
        self._num_pieces = self.sp_model.vocab_size()
        self.special_token_ids = {token: self._num_pieces + i for i, token in enumerate(self.SPECIAL_TOKENS)}
        self._vocab = {self.sp_model.IdToPiece(i): i for i in range(self._num_pieces)}
        self._vocab.update(self.special_token_ids)
        # The official class also calls the SentencePiece unk "<pad>"; pad and unk are both id 0.
        kwargs.update(eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        self._finish_init()

    @property
    def vocab_size(self) -> int:
        return self._num_pieces + len(self.SPECIAL_TOKENS)

    def get_command(self, token: str) -> int:
        """Id of `<bos>`, `<eos>`, `<pad>` or one of `SPECIAL_TOKENS` (the official helper)."""
        commands = {"<bos>": self.sp_model.bos_id(), "<eos>": self.sp_model.eos_id(), "<pad>": self.sp_model.unk_id()}
        commands.update(self.special_token_ids)
        if token not in commands:
            raise KeyError(f"{token!r} is not a special token of {type(self).__name__}; known: {sorted(commands)}")
        return commands[token]

    def get_prefix_tokens(self) -> list[int]:
        return [self.special_token_ids["[gMASK]"], self.special_token_ids["sop"]]

    def build_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """The ChatGLM2-6B chat prompt: always in rounds, numbered from 1, separated by blank lines."""
        history = history or []
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, start=1))
        return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.EncodeAsPieces(text)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_token_ids:
            return self.special_token_ids[token]
        return self.sp_model.PieceToId(token)

    def _convert_id_to_token(self, index: int) -> str:
        # bos/eos/pad and the appended special tokens decode to nothing in ChatGLM2.
        hidden = (self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id())
        if index in hidden or not 0 <= index < self._num_pieces:
            return ""
        return self.sp_model.IdToPiece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.DecodePieces(tokens)

    def _ids_dropped_when_decoding(self, skip_special_tokens: bool) -> set[int]:
        dropped = super()._ids_dropped_when_decoding(skip_special_tokens)
        return dropped | set(self.special_token_ids.values()) if skip_special_tokens else dropped

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def _pad_left(self, encoded_inputs: dict[str, Any], max_length: int | None, padding: int) -> dict:
        """Always add a 1/0 attention mask and positions 0..n-1 (pads: 0, 0, id 0)."""
        ids = encoded_inputs[self.model_input_names[0]]
        length = len(ids)
        encoded_inputs.setdefault("attention_mask", [1] * length)
        encoded_inputs.setdefault("position_ids", list(range(length)))
        if padding:
            encoded_inputs["attention_mask"] = [0] * padding + list(encoded_inputs["attention_mask"])
            encoded_inputs["position_ids"] = [0] * padding + list(encoded_inputs["position_ids"])
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * padding + ids
        return encoded_inputs


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B tokenizer: the ChatGLM2 one plus role tokens 64794..64797 and the chat input builder.

    Role tokens and the other appended special tokens decode to their text; bos/eos/pad decode to "".
    With `encode_special_tokens=True`, role-token strings inside text encode to the role ids.
    """

    chatglm_version = CHATGLM3.version
    ROLES = CHATGLM3_ROLES
    SPECIAL_TOKENS = ChatGLM2Tokenizer.SPECIAL_TOKENS + tuple(f"<|{role}|>" for role in ROLES)

    def __init__(self, vocab_file: str, encode_special_tokens: bool = False, **kwargs: Any) -> None:
        self.encode_special_tokens = encode_special_tokens
        super().__init__(vocab_file, encode_special_tokens=encode_special_tokens, **kwargs)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if not self.encode_special_tokens:
            return self.sp_model.EncodeAsPieces(text)
        pieces: list[str] = []
        for i, chunk in enumerate(split_around(text, [f"<|{role}|>" for role in self.ROLES])):
            if i % 2:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self.sp_model.EncodeAsPieces(chunk))
        return pieces

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.special_token_ids.values():
            return self.SPECIAL_TOKENS[index - self._num_pieces]
        return super()._convert_id_to_token(index)

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """`[<|role|>] + encode(metadata + "\\n") + encode(message)`, without special-token prefix."""
        if role not in self.ROLES:
            raise ValueError(f"role must be one of {self.ROLES}, found {role!r}")
        return (
            [self.special_token_ids[f"<|{role}|>"]]
            + self.sp_model.Encode(f"{metadata}\n")
            + self.sp_model.Encode(message)
        )

    def build_chat_input(
        self, query: str, history: list[dict[str, Any]] | None = None, role: str = "user"
    ) -> BatchEncoding:
        """Model input for one chat turn: `[gMASK, sop]`, the history messages, the query, `<|assistant|>`.

        `history` holds `{"role", "content"}` dicts (optional "metadata"; a system message may carry
        "tools", appended to its content as indented JSON). Returns input_ids, attention_mask and
        position_ids as tensors of shape [1, n].
        """
        ids: list[int] = []
        for message in history or []:
            content = message["content"]
            if message["role"] == "system" and "tools" in message:
                content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
            ids.extend(self.build_single_message(message["role"], message.get("metadata", ""), content))
        ids.extend(self.build_single_message(role, "", query))
        ids.append(self.special_token_ids["<|assistant|>"])
        return self.prepare_for_model(ids, add_special_tokens=True, return_tensors="pt", prepend_batch_axis=True)


def _family_class(has_glm1: bool, has_glm2: bool, version: int | None) -> type[ChatGLMTokenizer]:
    """Pick the family from the vocabulary files present and an optional explicit version (1, 2 or 3)."""
    classes = {cls.chatglm_version: cls for cls in (ChatGLM6BTokenizer, ChatGLM2Tokenizer, ChatGLM3Tokenizer)}
    if version is None:
        version = CHATGLM.version if has_glm1 else CHATGLM2.version
    family = classes.get(int(version))
    if family is None:
        raise ValueError(f"chatglm_version must be 1, 2 or 3, found {version!r}")
    needed = family.vocab_files_names["vocab_file"]
    if not (has_glm1 if needed == GLM1_VOCAB_FILE else has_glm2):
        found = GLM1_VOCAB_FILE if has_glm1 else GLM2_VOCAB_FILE if has_glm2 else "neither"
        raise OSError(f"chatglm_version={version} needs {needed}; found {found}")
    return family


def _family_for_folder(path: str, kwargs: dict[str, Any]) -> type[ChatGLMTokenizer]:
    """Pick the family of a tokenizer folder (or hub id) and record the version in `kwargs`."""
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}

    def locate(name: str) -> str | None:
        return cached_file(
            path,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )

    def read_json(name: str) -> dict[str, Any]:
        found = locate(name)
        if found is None:
            return {}
        with open(found, encoding="utf-8") as handle:
            return json.load(handle)

    version = kwargs.get("chatglm_version")
    has_glm1, has_glm2 = locate(GLM1_VOCAB_FILE) is not None, locate(GLM2_VOCAB_FILE) is not None
    if not (has_glm1 or has_glm2):
        raise OSError(f"{path} holds neither {GLM1_VOCAB_FILE} (ChatGLM-6B) nor {GLM2_VOCAB_FILE} (ChatGLM2/3)")
    if version is None and has_glm2 and not has_glm1:
        tokenizer_config = read_json("tokenizer_config.json")
        version = tokenizer_config.get("chatglm_version")
        if version is None:
            names = (tokenizer_config.get("name_or_path"), read_json("config.json").get("_name_or_path"))
            named_glm3 = any(CHATGLM3.name in str(name).lower() for name in names if name)
            version = CHATGLM3.version if named_glm3 else CHATGLM2.version
    family = _family_class(has_glm1, has_glm2, version)
    kwargs["chatglm_version"] = family.chatglm_version
    return family
