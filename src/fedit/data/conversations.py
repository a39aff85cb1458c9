"""Conversation rows: validation, rendering with a chat template, and the label mask.

A conversation row holds ``messages``, a list of ``{"role", "content"}`` turns (OpenAI's
shape); ShareGPT's ``{"from", "value"}`` turns (``human``/``gpt``/``system``) are read as
the same. Turns are an optional ``system`` turn, then ``user`` and ``assistant`` in turn,
starting with ``user``; every assistant turn is non-empty and there is at least one.

Rendering uses the model's chat template, or the built-in ChatML text
(``<|im_start|>role\\ncontent<|im_end|>\\n``) with ``data.template = "chatml"``. Every
assistant turn carries labels, found by rendering and tokenising the conversation up to
each turn: each such prefix must tokenise to a prefix of the whole (else the template
cannot be masked turn by turn, and a clear error says so). Too long for ``cutoff_len``: the
conversation loses whole turns from its end, never part of an answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedit.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant"}
NO_CHAT_TEMPLATE = ("the model's tokenizer has no chat template, which conversations and "
                    "data.template = \"chat\" need; set data.template = \"chatml\" to use "
                    "the built-in ChatML text")


def canonical_conversation(value: Any, where: str, column: str) -> dict[str, Any]:
    """A validated conversation as canonical fields: ``messages`` (``{role, content}``
    turns), plus ``instruction`` (the last user turn), ``context`` (``""``) and
    ``response`` (the last assistant turn), which evaluation answers and scores.

    Raises
    ------
    DataError
        ``where: ...``, naming the turn and what is wrong with it.
    """
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {column!r} must be a non-empty list of turns "
                        "({role, content} or ShareGPT {from, value})")
    messages = [_turn(t, where, i + 1) for i, t in enumerate(value)]
    _check_order(messages, where)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"instruction": messages[last - 1]["content"], "context": "",
            "response": messages[last]["content"], "messages": messages}


def _turn(turn: Any, where: str, n: int) -> dict[str, str]:
    """One turn as ``{role, content}``; ``n`` counts turns from 1."""
    if not isinstance(turn, dict):
        raise DataError(f"{where}: turn {n} must be an object with role and content")
    sharegpt = "role" not in turn and "from" in turn
    role = turn.get("from") if sharegpt else turn.get("role")
    content = turn.get("value") if sharegpt else turn.get("content")
    if role is None:
        raise DataError(f"{where}: turn {n} has no role (give role/content, or ShareGPT's "
                        "from/value)")
    role = SHAREGPT_ROLES.get(str(role)) if sharegpt else role
    if role not in ROLES:
        got = turn.get("from") if sharegpt else turn.get("role")
        raise DataError(f"{where}: turn {n} has role {got!r}; use system, user or assistant "
                        "(ShareGPT: system, human or gpt)")
    if not isinstance(content, str):
        raise DataError(f"{where}: turn {n} ({role}) has no text content (a string)")
    if role == "assistant" and not content.strip():
        raise DataError(f"{where}: turn {n} is an empty assistant turn; fill it in or "
                        "remove the row")
    return {"role": role, "content": content}


def _check_order(messages: list[dict[str, str]], where: str) -> None:
    """An optional system turn first, then user and assistant in turn, user first."""
    start = int(messages[0]["role"] == "system")
    for i, m in enumerate(messages[start:], start=start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != want:
            before = messages[i - 1]["role"] if i else None
            reason = ("a system turn after the first" if m["role"] == "system" else
                      f"two {m['role']} turns in a row" if before == m["role"] else
                      f"the conversation starts with an {m['role']} turn")
            raise DataError(f"{where}: turn {i + 1}: {reason}; turns must be an optional "
                            "system turn, then user and assistant in turn")
    if len(messages) == start or messages[-1]["role"] != "assistant":
        reason = ("no assistant turn" if not any(m["role"] == "assistant" for m in messages)
                  else "the last user turn has no answer")
        raise DataError(f"{where}: {reason}; a conversation ends with an assistant turn "
                        "to learn from")


def is_conversation(row: Mapping[str, Any]) -> bool:
    """True for a canonical conversation row (one with ``messages``)."""
    return isinstance(row.get("messages"), list)


def chat_template_of(row: Mapping[str, Any], template: str) -> str:
    """The template a row is rendered with: a conversation uses the model's chat template
    (``chat``) unless ``chatml`` is named; an instruction row uses ``template``."""
    if is_conversation(row):
        return "chatml" if template == "chatml" else "chat"
    return template


def check_chat_template(tokenizer: Any, clients: Sequence[Sequence[Mapping[str, Any]]],
                        template: str) -> None:
    """Refuse at once (rather than in every client's round) rows that need the model's
    chat template when it has none."""
    needs = template == "chat" or (template != "chatml" and any(
        is_conversation(row) for rows in clients for row in rows))
    if needs and not getattr(tokenizer, "chat_template", None):
        raise DataError(NO_CHAT_TEMPLATE)


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]], template: str,
           add_generation_prompt: bool) -> str:
    """The text of ``messages`` in ChatML (``template == "chatml"``) or the model's chat
    template (refused with a clear message when the model has none)."""
    if template == "chatml":
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(NO_CHAT_TEMPLATE)
    out = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                        add_generation_prompt=add_generation_prompt)
    return str(out)


def conversation_prompt(tokenizer: Any, row: Mapping[str, Any], template: str) -> str:
    """The conversation up to (not including) its last assistant turn, ready for the
    answer: what evaluation asks the model to continue."""
    messages = row["messages"]
    return render(tokenizer, messages[:-1], chat_template_of(row, template), True)


def assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, str]],
                    template: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The token ids of the whole conversation and, per assistant turn, the ``[start,
    end)`` of its tokens (the turn's end marker included).

    Raises
    ------
    DataError
        When the template does not render each turn as a prefix of the whole.
    """
    special = template != "chat"  # a chat template's text carries its special tokens

    def ids(upto: int, gen: bool) -> list[int]:
        text = render(tokenizer, messages[:upto], template, gen)
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    whole = ids(len(messages), False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = ids(i, True), ids(i + 1, False)
        if through[: len(before)] != before or whole[: len(through)] != through:
            raise DataError(f"the chat template does not render turn {i + 1} of a "
                            "conversation as a prefix of the whole, so its answer tokens "
                            "cannot be found; set data.template = \"chatml\"")
        spans.append((len(before), len(through)))
    return whole, spans


def fit_conversation(
    tokenizer: Any, row: Mapping[str, Any], *, template: str, cutoff_len: int,
) -> tuple[list[int], list[tuple[int, int]], bool]:
    """``(input_ids, spans, truncated)``: the assistant turns' spans that fit in
    ``cutoff_len``, the ids up to the end of the last of them (whole turns past it are
    dropped: ``truncated``); no ids when not even the first answer fits."""
    ids, spans = assistant_spans(tokenizer, row["messages"], chat_template_of(row, template))
    fitting = [s for s in spans if s[1] <= cutoff_len]
    end = fitting[-1][1] if fitting else 0
    return ids[:end], fitting, len(fitting) < len(spans)
