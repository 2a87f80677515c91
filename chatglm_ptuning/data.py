"""Read and validate fine-tuning data, and turn it into input_ids/labels for each ChatGLM family.

Files: ``.json`` holding either a JSON array of rows or one JSON object per line, and ``.jsonl``.

Layouts (a row is one JSON object):

- prompt/response columns, named by ``--prompt_column`` / ``--response_column``: ADGEN
  (``content`` / ``summary``) or chat data (``prompt`` / ``response``), optionally with a
  ``--history_column`` holding earlier turns as ``[[query, response], ...]``.
- ChatGLM3 conversations (``--train_format conversations``): ``{"tools"?: [...], "conversations":
  [{"role": "system" | "user" | "assistant" | "observation", "content": str, "loss"?: bool}, ...]}``,
  where a message may also be a tool step ``{"role": "tool", "name": str, "parameters": {...},
  "observation": any, "loss"?: bool}``. As in the ChatGLM3 fine-tuning demo
  (``finetune_chatmodel_demo/preprocess_utils.py``: ``format_conversation``), ``tools`` becomes a
  first system message (the tool prompt + ``json.dumps(tools, indent=4, ensure_ascii=False)``) and a
  tool step becomes the assistant's function call (metadata = name, content = the fenced
  ``tool_call(k=v, ...)``) followed by the observation (non-string values JSON-encoded, no loss).

Token layouts follow the reference's ``preprocess_function_train`` / ``preprocess_function_eval``
(ChatGLM-6B and ChatGLM2-6B ``ptuning/main.py``) and, for role-token conversations, the ChatGLM3
fine-tuning demo (``finetune_chatmodel_demo/preprocess_utils.py``); ``a`` is the prompt, ``b`` the response:

- ChatGLM-6B training: ``a[:max_source-1] + [gMASK, sop] + b[:max_target-2] + [eop]``, labels -100
  up to and including gMASK; the fixed length is ``max_source + max_target``. With a history
  column the ``[Round i]`` template is used even for an empty history.
- ChatGLM2-6B training: ``a = [gMASK, sop] + build_prompt(query, history)`` truncated to
  max_source (specials included), ``b`` truncated to max_target; ``ids = a + b + [eos]``, labels
  ``[pad]*len(a) + b + [eos]``; the fixed length is ``max_source + max_target + 1``.
- ChatGLM3-6B: data without history is "input-output" (the raw prompt, otherwise as ChatGLM2).
  Conversations (and prompt/response data with a history column) use the role-token template
  ``[gMASK, sop] + (<|role|> + metadata + "\\n" + content)* + [eos]``; a token is labelled when the
  token before it belongs to a loss-bearing message (every message but system and user, unless
  ``"loss": false``, as the original); truncated to ``max_source + max_target + 1``.
- Training rows are left unpadded (each batch is padded to its own longest row by
  ``collator.TrainBatchCollator``); with ``pad_to_max_length`` they are right-padded to the fixed
  length with the pad id (labels: -100), the reference's layout. Right padding never changes a
  real token's output: attention is causal after ``<sop>`` in every family.
- Eval/predict, every family: the prompt alone, left-padded within each map batch by the
  tokenizer, and labels = the response encoded with special tokens, truncated to
  ``val_max_target_length``.

In every layout, when ``ignore_pad_token_for_loss`` is on, every label equal to the pad id
becomes -100 (as the reference; ChatGLM2/3's pad id is 0, so a genuine token 0 is masked too).

Multi-turn prompt/response data: the reference learns only the last turn of each row. With
``all_turns`` every assistant turn is learned: on ChatGLM-6B/ChatGLM2-6B each earlier turn
becomes an extra training example (same token layout, its own history); on ChatGLM3-6B the
earlier assistant messages of the one conversation carry loss too. Conversations data always
learns every assistant message, as the ChatGLM3 reference does (``"loss": false`` opts one out).
Conversations are evaluated on their last answer; when that is a function call, the reference text
is ``name + "\\n"`` + the fenced call, what the model generates after ``<|assistant|>``.

``source_prefix`` is put before the templated prompt (for role-token conversations: before the
content of the first message, the tool system message when the row has ``tools``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .constants import IGNORE_INDEX
from .families import CHATGLM, CHATGLM2, CHATGLM3, CHATGLM3_ROLES, FAMILIES
from .tools import render_tool_call, tools_system_content

logger = logging.getLogger(__name__)

FAMILY_GLM1, FAMILY_GLM2, FAMILY_GLM3 = CHATGLM.name, CHATGLM2.name, CHATGLM3.name  # "chatglm", "chatglm2", "chatglm3"
CONVERSATIONS_FORMAT = "conversations"
CONVERSATIONS_KEY = "conversations"
TOOLS_KEY = "tools"
TOOL_ROLE = "tool"  # not a ChatGLM3 role: a function call and its observation in one message
ROLES = (*CHATGLM3_ROLES, TOOL_ROLE)


class DataArgs(Protocol):
    """What preprocessing reads from the data arguments (see arguments.DataTrainingArguments)."""

    prompt_column: str | None
    response_column: str | None
    history_column: str | None
    max_source_length: int
    max_target_length: int
    val_max_target_length: int | None
    ignore_pad_token_for_loss: bool
    source_prefix: str | None
    train_format: str | None
    all_turns: bool
    pad_to_max_length: bool


class DataError(ValueError):
    """Bad training data; the message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


# ------------------------------------------------------------------------------------ reading


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    position = _skip_whitespace(text, text.index("[") + 1)
    if position < len(text) and text[position] == "]":
        position += 1
    else:
        while True:
            start = _skip_whitespace(text, position)
            try:
                value, position = decoder.raw_decode(text, start)
            except json.JSONDecodeError as error:
                raise DataError(path, error.lineno, f"invalid JSON: {error.msg} (column {error.colno})") from None
            records.append((_line_of(text, start), value))
            position = _skip_whitespace(text, position)
            if position < len(text) and text[position] == ",":
                position += 1
                continue
            if position < len(text) and text[position] == "]":
                position += 1
                break
            raise DataError(path, _line_of(text, position), "invalid JSON: expected ',' or ']' after an array element")
    if _skip_whitespace(text, position) != len(text):
        raise DataError(path, _line_of(text, position), "invalid JSON: extra data after the top-level array")
    return records


def _read_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    records: list[tuple[int, Any]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(
                path,
                line_number,
                f"invalid JSON: {error.msg} (column {error.colno}); expected one JSON object per line, or a JSON array",
            ) from None
    return records


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in a parsed JSON value that holds a lone UTF-16 surrogate
    (JSON allows the escape "\\ud800"; no Unicode text can hold it), else None. Iterative: rows
    may nest deeper than Python's recursion limit allows."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def _check_text(path: Path, records: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    for line, value in records:
        bad = _lone_surrogate(value)
        if bad is not None:
            position = next(i for i, ch in enumerate(bad) if 0xD800 <= ord(ch) <= 0xDFFF)
            raise DataError(
                path,
                line,
                f"the string {json.dumps(bad[:40])} holds a lone surrogate \\u{ord(bad[position]):04x} at character "
                f"{position + 1}: not valid Unicode text",
            )
    return records


def read_json_records(path: str | Path) -> list[tuple[int, Any]]:
    """Parses a .json (array or one value per line) or .jsonl file into (line, value) pairs;
    every string must be valid Unicode (no lone surrogates)."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(path, None, f"expected a .json or .jsonl file, found {path.suffix or 'no extension'}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(path, error.object.count(b"\n", 0, error.start) + 1, "not UTF-8 text") from None
    except OSError as error:
        raise DataError(path, None, f"cannot read the file ({error.strerror})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return _check_text(path, _read_array(path, text))
    return _check_text(path, _read_lines(path, text))


# --------------------------------------------------------------------------------- validation


@dataclass
class LoadedRows:
    """Validated rows of one file, normalised to the columns preprocessing reads.

    ``skipped_lines`` are the lines of rows dropped for an empty prompt or response (or, for
    conversations, no assistant message with content), as the reference drops them.
    """

    path: str
    rows: list[dict[str, Any]]
    skipped_lines: list[int] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.skipped_lines)

    def to_dataset(self) -> Any:
        """A ``datasets.Dataset`` of the rows, ready for ``map(build_preprocess_function(...))``."""
        import datasets  # imported here: reading and validating data does not need it

        return datasets.Dataset.from_list(self.rows)


def _column(row: dict, column: str, path: Path, line: int) -> Any:
    if column not in row:
        raise DataError(path, line, f'missing column "{column}" (found columns: {", ".join(sorted(row)) or "none"})')
    return row[column]


def _string_field(row: dict, column: str, path: Path, line: int) -> str | None:
    """The value of a required text column: None when null (treated as empty), else a string."""
    value = _column(row, column, path, line)
    if value is not None and not isinstance(value, str):
        raise DataError(
            path,
            line,
            f'"{column}": expected a string, found {_json_type(value)} {json.dumps(value, ensure_ascii=False)[:60]}',
        )
    return value


def _history_field(row: dict, column: str, path: Path, line: int) -> list[list[str]]:
    history = _column(row, column, path, line)
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(
            path, line, f'"{column}": expected an array of [query, response] pairs, found {_json_type(history)}'
        )
    for index, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(text, str) for text in turn)):
            found = json.dumps(turn, ensure_ascii=False)[:60]
            raise DataError(
                path, line, f'"{column}"[{index}]: expected a [query, response] pair of strings, found {found}'
            )
    return [list(turn) for turn in history]


def _prompt_response_row(row: dict, args: DataArgs, path: Path, line: int) -> dict | None:
    prompt = _string_field(row, args.prompt_column, path, line)
    response = _string_field(row, args.response_column, path, line)
    normalised: dict[str, Any] = {args.prompt_column: prompt, args.response_column: response}
    if args.history_column:
        normalised[args.history_column] = _history_field(row, args.history_column, path, line)
    return normalised if prompt and response else None


def _message(role: str, content: str, loss: bool | None, metadata: str = "") -> dict[str, Any]:
    return {"role": role, "metadata": metadata, "content": content, "loss": loss}


def _tool_messages(message: dict, where: str, path: Path, line: int) -> list[dict[str, Any]]:
    """A `{"role": "tool", "name", "parameters", "observation"}` message as the original's two turns:
    the assistant's function call (metadata = name, content = the fenced `tool_call(...)`; loss unless
    `"loss": false`) and the observation (non-string observations JSON-encoded; never loss)."""
    name, parameters = message.get("name"), message.get("parameters")
    if not isinstance(name, str) or not name.strip():
        found = "nothing" if "name" not in message else f"{_json_type(name)} {json.dumps(name, ensure_ascii=False)}"
        raise DataError(path, line, f'{where}."name": a "tool" message needs the tool\'s name as a string, found {found}')
    if not isinstance(parameters, dict):
        found = "nothing" if "parameters" not in message else _json_type(parameters)
        raise DataError(
            path, line, f'{where}."parameters": a "tool" message needs the call\'s arguments as an object, found {found}'
        )
    observation = message.get("observation")
    observation = observation if isinstance(observation, str) else json.dumps(observation, ensure_ascii=False)
    call = _message("assistant", render_tool_call(parameters), message.get("loss"), metadata=name)
    return [call, _message("observation", observation, False)]


def _conversation_row(row: dict, path: Path, line: int, family: str | None) -> dict | None:
    messages = _column(row, CONVERSATIONS_KEY, path, line)
    if not isinstance(messages, list):
        raise DataError(
            path, line, f'"{CONVERSATIONS_KEY}": expected an array of messages, found {_json_type(messages)}'
        )
    uses_tools = TOOLS_KEY in row or any(isinstance(m, dict) and m.get("role") == TOOL_ROLE for m in messages)
    if family not in (None, FAMILY_GLM3):
        what = "tool definitions and calls need" if uses_tools else "--train_format conversations needs"
        raise DataError(path, line, f"{what} a ChatGLM3 tokenizer (role tokens); this tokenizer is {family}")
    normalised = []
    if TOOLS_KEY in row:
        tools = row[TOOLS_KEY]
        if not isinstance(tools, list):
            raise DataError(path, line, f'"{TOOLS_KEY}": expected an array of tool definitions, found {_json_type(tools)}')
        normalised.append(_message("system", tools_system_content(tools), None))
    for index, message in enumerate(messages):
        where = f'"{CONVERSATIONS_KEY}"[{index}]'
        if not isinstance(message, dict):
            raise DataError(
                path, line, f"{where}: expected an object with role and content, found {_json_type(message)}"
            )
        role, content, loss = message.get("role"), message.get("content"), message.get("loss")
        if role not in ROLES:
            raise DataError(
                path,
                line,
                f'{where}."role": expected one of {", ".join(ROLES)}, found {json.dumps(role, ensure_ascii=False)}',
            )
        if loss is not None and not isinstance(loss, bool):
            raise DataError(path, line, f'{where}."loss": expected true or false, found {_json_type(loss)}')
        if role == TOOL_ROLE:
            normalised += _tool_messages(message, where, path, line)
            continue
        if not isinstance(content, str):
            raise DataError(path, line, f'{where}."content": expected a string, found {_json_type(content)}')
        normalised.append(_message(role, content, loss))
    return {CONVERSATIONS_KEY: normalised} if _has_answer(normalised) else None


def validate_records(
    records: Sequence[tuple[int, Any]], args: DataArgs, path: str | Path, family: str | None = None
) -> LoadedRows:
    """Checks every row of one file against the layout that ``args`` selects (and, when ``family``
    is given, that conversations rows are for a ChatGLM3 tokenizer).

    Raises DataError on the first bad row, or when no usable row is left.
    """
    path = Path(path)
    conversations = args.train_format == CONVERSATIONS_FORMAT
    if not conversations and not (args.prompt_column and args.response_column):
        raise ValueError("give --prompt_column and --response_column (or --train_format conversations)")
    rows, skipped = [], []
    for line, row in records:
        if not isinstance(row, dict):
            raise DataError(path, line, f"expected a JSON object per row, found {_json_type(row)}")
        if conversations:
            kept = _conversation_row(row, path, line, family)
        else:
            kept = _prompt_response_row(row, args, path, line)
        if kept is None:
            skipped.append(line)
        else:
            rows.append(kept)
    what = "no assistant message with content" if conversations else "an empty prompt or response"
    if not rows:
        raise DataError(path, None, f"no usable rows ({len(records)} rows read, {len(skipped)} skipped for {what})")
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        logger.warning("%s: skipped %d of %d rows with %s (lines %s)", path, len(skipped), len(records), what, shown)
    return LoadedRows(str(path), rows, skipped)


def load_rows(path: str | Path, args: DataArgs, family: str | None = None) -> LoadedRows:
    """Reads and validates one data file (see ``read_json_records`` and ``validate_records``)."""
    return validate_records(read_json_records(path), args, path, family)


# ------------------------------------------------------------------------------ tokenization


_FAMILY_BY_VERSION = {family.version: family.name for family in FAMILIES}


def tokenizer_family(tokenizer: Any) -> str:
    """FAMILY_GLM1, FAMILY_GLM2 or FAMILY_GLM3, from the tokenizer's ``chatglm_version``."""
    version = getattr(tokenizer, "chatglm_version", None)
    if version not in _FAMILY_BY_VERSION:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a ChatGLM tokenizer (chatglm_version {version!r}); load it with AutoTokenizer after importing chatglm_ptuning"
        )
    return _FAMILY_BY_VERSION[version]


@dataclass(frozen=True)
class _Turn:
    """One supervised turn: ``history`` is None when the data has no history column."""

    query: str
    response: str
    history: list[list[str]] | None


def _turns(rows: dict[str, list], args: DataArgs, expand_history: bool) -> Iterator[_Turn]:
    """The rows' last turns (rows with an empty prompt or response are dropped, as the reference does);
    with ``expand_history`` every non-empty earlier turn first, each with the turns before it."""
    histories = rows[args.history_column] if args.history_column else [None] * len(rows[args.prompt_column])
    for query, response, history in zip(rows[args.prompt_column], rows[args.response_column], histories):
        if not (query and response):
            continue
        if args.history_column and history is None:
            history = []
        if expand_history and history:
            for index, (old_query, old_response) in enumerate(history):
                if old_query and old_response:
                    yield _Turn(old_query, old_response, history[:index])
        yield _Turn(query, response, history)


def _prompt_text(tokenizer: Any, family: str, turn: _Turn, train: bool) -> str:
    """The templated prompt of a prompt/response turn, before ``source_prefix``.

    ChatGLM-6B: the raw query without a history column, else the v1 round template; the
    reference's training code uses the template whenever a history column exists, even for an
    empty history (where ``build_prompt``, like eval and chat, gives the raw query).
    ChatGLM2-6B: ``build_prompt`` (always rounds). ChatGLM3-6B input-output: the raw query.
    """
    if family == FAMILY_GLM2:
        return tokenizer.build_prompt(turn.query, turn.history)
    if family == FAMILY_GLM3 or turn.history is None:
        return turn.query
    if train and not turn.history:
        return f"[Round 0]\n问：{turn.query}\n答："
    return tokenizer.build_prompt(turn.query, turn.history)


def _pad_right(
    ids: list[int], labels: list[int], length: int, pad_id: int, ignore_pad: bool
) -> tuple[list[int], list[int]]:
    """Right-pads ids and labels with the pad id to ``length`` (none when already that long);
    with ``ignore_pad`` every label equal to the pad id becomes -100."""
    pad = max(0, length - len(ids))
    ids, labels = ids + [pad_id] * pad, labels + [pad_id] * pad
    if ignore_pad:
        labels = [IGNORE_INDEX if label == pad_id else label for label in labels]
    return ids, labels


def _glm1_train(tokenizer: Any, prompt: str, response: str, args: DataArgs) -> tuple[list[int], list[int]]:
    """ChatGLM-6B: ``a + [gMASK, sop] + b + [eop]``, labelled from ``<sop>`` on."""
    a = tokenizer.encode(prompt, add_special_tokens=False)[: args.max_source_length - 1]
    b = tokenizer.encode(response, add_special_tokens=False)[: args.max_target_length - 2]
    ids = tokenizer.build_inputs_with_special_tokens(a, b)
    context = len(a) + 1  # the prompt and [gMASK]
    labels = [IGNORE_INDEX] * context + ids[context:]
    length = args.max_source_length + args.max_target_length if args.pad_to_max_length else 0
    return _pad_right(ids, labels, length, tokenizer.pad_token_id, args.ignore_pad_token_for_loss)


def _glm2_train(tokenizer: Any, prompt: str, response: str, args: DataArgs) -> tuple[list[int], list[int]]:
    """ChatGLM2-6B (and ChatGLM3-6B input-output): ``[gMASK, sop] + a + b + [eos]``, labelled on ``b + [eos]``."""
    a = tokenizer.encode(prompt, add_special_tokens=True, truncation=True, max_length=args.max_source_length)
    b = tokenizer.encode(response, add_special_tokens=False, truncation=True, max_length=args.max_target_length)
    eos = tokenizer.eos_token_id
    ids, labels = a + b + [eos], [tokenizer.pad_token_id] * len(a) + b + [eos]
    length = args.max_source_length + args.max_target_length + 1 if args.pad_to_max_length else 0
    return _pad_right(ids, labels, length, tokenizer.pad_token_id, args.ignore_pad_token_for_loss)


def _has_answer(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "assistant" and m["content"] for m in messages)


def _uses_role_tokens(family: str, args: DataArgs) -> bool:
    """True when rows are encoded as ChatGLM3 role-token conversations."""
    if args.train_format == CONVERSATIONS_FORMAT:
        if family != FAMILY_GLM3:
            raise ValueError(
                f"--train_format conversations needs a ChatGLM3 tokenizer (role tokens); this tokenizer is {family}"
            )
        return True
    return family == FAMILY_GLM3 and bool(args.history_column)


def _conversations(rows: dict[str, list], args: DataArgs, all_turns: bool) -> list[list[dict[str, Any]]]:
    """The batch as ChatGLM3 message lists: conversations rows as they are, prompt/response rows
    as user/assistant turns whose earlier answers carry loss only with ``all_turns``."""
    if args.train_format == CONVERSATIONS_FORMAT:
        return [messages for messages in rows[CONVERSATIONS_KEY] if _has_answer(messages)]
    conversations = []
    for turn in _turns(rows, args, expand_history=False):
        messages: list[dict[str, Any]] = []
        for query, response in turn.history or []:
            messages += [
                {"role": "user", "content": query, "loss": None},
                {"role": "assistant", "content": response, "loss": all_turns},
            ]
        messages += [
            {"role": "user", "content": turn.query, "loss": None},
            {"role": "assistant", "content": turn.response, "loss": None},
        ]
        conversations.append(messages)
    return conversations


def _with_prefix(messages: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    if not prefix:
        return messages
    return [{**messages[0], "content": prefix + messages[0]["content"]}] + messages[1:]


def _carries_loss(message: dict[str, Any]) -> bool:
    """As the original's `format_conversation`: system and user messages never carry loss, every other
    message (assistant, observation, a tool call) does unless ``"loss": false``."""
    return message["role"] not in ("system", "user") and message.get("loss") is not False


def _message_ids(tokenizer: Any, message: dict[str, Any]) -> list[int]:
    return tokenizer.build_single_message(message["role"], message.get("metadata") or "", message["content"])


def _conversation_train(tokenizer: Any, messages: list[dict[str, Any]], args: DataArgs) -> tuple[list[int], list[int]]:
    """ChatGLM3 role-token layout; labels follow the loss mask shifted by one (as the ChatGLM3
    fine-tuning demo's ``preprocess_utils.py``)."""
    ids = tokenizer.build_inputs_with_special_tokens([])  # [gMASK, sop]
    in_loss = [False] * len(ids)
    for message in messages:
        message_ids = _message_ids(tokenizer, message)
        ids += message_ids
        in_loss += [_carries_loss(message)] * len(message_ids)
    ids.append(tokenizer.eos_token_id)
    # A token is a target when the token before it belongs to a loss-bearing message: the role
    # token of an answer is not learned, the token right after the answer (next role or eos) is.
    labels = [IGNORE_INDEX] + [token if previous else IGNORE_INDEX for token, previous in zip(ids[1:], in_loss)]
    length = args.max_source_length + args.max_target_length + 1
    ids, labels = ids[:length], labels[:length]
    pad = length - len(ids) if args.pad_to_max_length else 0
    return ids + [tokenizer.pad_token_id] * pad, labels + [IGNORE_INDEX] * pad


def preprocess_train(
    tokenizer: Any, rows: dict[str, list], args: DataArgs, family: str | None = None
) -> dict[str, list[list[int]]]:
    """Training features for a batch of rows (a ``datasets.map(batched=True)`` batch).

    Args:
        tokenizer: a ChatGLM tokenizer of any family.
        rows: column name -> list of values, as validated by ``load_rows``.
        args: data arguments (see ``DataArgs``).
        family: FAMILY_*; detected from the tokenizer when None.

    Returns:
        ``{"input_ids": [[...]], "labels": [[...]]}``, unpadded, or padded to the family's fixed
        length with ``args.pad_to_max_length``; rows with an empty prompt or response (or no
        answer) produce nothing.
    """
    family = family or tokenizer_family(tokenizer)
    prefix = args.source_prefix or ""
    if _uses_role_tokens(family, args):
        pairs = [
            _conversation_train(tokenizer, _with_prefix(messages, prefix), args)
            for messages in _conversations(rows, args, args.all_turns)
        ]
    else:
        encode = _glm1_train if family == FAMILY_GLM1 else _glm2_train
        pairs = [
            encode(tokenizer, prefix + _prompt_text(tokenizer, family, turn, train=True), turn.response, args)
            for turn in _turns(rows, args, expand_history=args.all_turns)
        ]
    return {"input_ids": [ids for ids, _ in pairs], "labels": [labels for _, labels in pairs]}


def train_label_pad_id(tokenizer: Any, args: DataArgs) -> int:
    """The label that pads a training row: -100, or the pad id for prompt/response rows when
    ``ignore_pad_token_for_loss`` is off (the reference then trains on the pads; role-token rows
    always pad labels with -100). Per-batch padding with this label gives the fixed layout's
    labels, cut at the batch's longest row."""
    if args.ignore_pad_token_for_loss or _uses_role_tokens(tokenizer_family(tokenizer), args):
        return IGNORE_INDEX
    return tokenizer.pad_token_id


def _conversation_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], max_length: int) -> list[int]:
    """ChatGLM3 generation input: [gMASK, sop], the messages, then <|assistant|>.

    When too long, the oldest tokens after [gMASK, sop] are dropped, so the question and the
    assistant tag that generation needs are kept.
    """
    prefix = tokenizer.build_inputs_with_special_tokens([])
    body = [token for message in messages for token in _message_ids(tokenizer, message)]
    body.append(tokenizer.convert_tokens_to_ids("<|assistant|>"))
    return prefix + body[max(0, len(body) - (max_length - len(prefix))) :]


def _split_last_answer(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """(the messages before the last non-empty answer, that answer). A function-call answer is
    `name\n` + the fenced call, the text the model generates after `<|assistant|>` for it."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"])
    metadata = messages[last].get("metadata") or ""
    return messages[:last], (metadata + "\n" if metadata else "") + messages[last]["content"]


def preprocess_eval(
    tokenizer: Any, rows: dict[str, list], args: DataArgs, family: str | None = None
) -> dict[str, list]:
    """Eval/predict features: left-padded prompts plus reference labels, for a batch of rows.

    Prompts are padded to the longest in the batch (the tokenizer's left padding, with its
    attention_mask / position_ids) and truncated to ``max_source_length``; labels are the
    responses encoded with special tokens, truncated to ``val_max_target_length``, pad ids ->
    -100 when ``ignore_pad_token_for_loss``. Conversations are scored on their last answer.
    """
    family = family or tokenizer_family(tokenizer)
    prefix = args.source_prefix or ""
    if _uses_role_tokens(family, args):
        dialogues = [_split_last_answer(messages) for messages in _conversations(rows, args, all_turns=False)]
        if not dialogues:
            return {"input_ids": [], "labels": []}
        prompt_ids = [
            _conversation_prompt_ids(tokenizer, _with_prefix(messages, prefix), args.max_source_length)
            for messages, _ in dialogues
        ]
        model_inputs = dict(tokenizer.pad({"input_ids": prompt_ids}, padding=True))
        targets = [answer for _, answer in dialogues]
    else:
        turns = list(_turns(rows, args, expand_history=False))
        if not turns:
            return {"input_ids": [], "labels": []}
        prompts = [prefix + _prompt_text(tokenizer, family, turn, train=False) for turn in turns]
        model_inputs = dict(tokenizer(prompts, max_length=args.max_source_length, truncation=True, padding=True))
        targets = [turn.response for turn in turns]
    max_target = args.val_max_target_length or args.max_target_length
    labels = tokenizer(text_target=targets, max_length=max_target, truncation=True)["input_ids"]
    if args.ignore_pad_token_for_loss:
        labels = [[IGNORE_INDEX if token == tokenizer.pad_token_id else token for token in row] for row in labels]
    model_inputs["labels"] = labels
    return model_inputs


def build_preprocess_function(
    tokenizer: Any, args: DataArgs, train: bool
) -> Callable[[dict[str, list]], dict[str, list]]:
    """The ``datasets.map(batched=True)`` function for training (``train``) or eval/predict data.

    Map with ``remove_columns`` set to all input columns: rows with an empty prompt or
    response produce no output row.
    """
    family = tokenizer_family(tokenizer)
    preprocess = preprocess_train if train else preprocess_eval

    def preprocess_batch(rows: dict[str, list]) -> dict[str, list]:
        return preprocess(tokenizer, rows, args, family)

    return preprocess_batch
