"""Conversation rows: validation, rendering with a chat template, and the label mask.

A conversation row holds ``messages``, a list of ``{"role", "content"}`` turns (OpenAI's
shape); ShareGPT's ``{"from", "value"}`` turns are read as the same. Roles go through
:data:`ROLE_ALIASES` (fedit's own list: ``human``/``user`` are the user, ``gpt``,
``chatgpt``, ``bing``, ``bard``, ``assistant`` the assistant). As the community reads
ShareGPT (FastChat's loader drops a first non-human turn): assistant turns that open the
conversation (after an optional system turn) are dropped, and so is a last user turn with no
answer; both are counted. What is left must be an optional ``system`` turn, then ``user``
and ``assistant`` in turn, every assistant turn non-empty, at least one exchange; anything
else is an invalid row (:class:`~fedit.data.invalid.RowError`, ``data.invalid_rows``).

Rendering uses the model's chat template, or the built-in ChatML text
(``<|im_start|>role\\ncontent<|im_end|>\\n``) with ``data.template = "chatml"``. Every
assistant turn carries labels, found by rendering and tokenising the conversation up to
each turn: each such prefix must tokenise to a prefix of the whole (else the template
cannot be masked turn by turn, and a clear error says so). Too long for ``cutoff_len``: the
conversation loses whole turns from its end. With ``truncation="context"`` a first answer
that would keep fewer than ``min_response_tokens`` tokens (or its whole length, when
shorter) gets room: the longest of the system and first user turns loses its middle (start
and end kept, joined by :data:`TRUNCATION_MARKER`), and the first answer may be cut at
``cutoff_len`` (as an instruction row's response).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from fedit.data.invalid import (
    BAD_TURN,
    EMPTY_ANSWER,
    EMPTY_CONVERSATION,
    LEADING_ASSISTANT,
    NO_EXCHANGE,
    TRAILING_USER,
    TURN_ORDER,
    UNKNOWN_ROLE,
    WRONG_TYPE,
    RowError,
)
from fedit.errors import DataError

ROLES = ("system", "user", "assistant")
# fedit's own rule, for both shapes: the roles ShareGPT exports are seen to use
ROLE_ALIASES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                "assistant": "assistant"}
TRUNCATION_MARKER = " [...] "  # where a shortened turn, context or instruction lost its middle
NO_CHAT_TEMPLATE = ("the model's tokenizer has no chat template, which conversations and "
                    "data.template = \"chat\" need; set data.template = \"chatml\" to use "
                    "the built-in ChatML text")


def canonical_conversation(value: Any, where: str, column: str,
                           dropped: Counter[str] | None = None) -> dict[str, Any]:
    """A validated conversation as canonical fields: ``messages`` (``{role, content}``
    turns), plus ``instruction`` (the last user turn), ``context`` (``""``) and
    ``response`` (the last assistant turn), which evaluation answers and scores.
    ``dropped`` counts the leading assistant and trailing user turns dropped.

    Raises
    ------
    RowError
        ``where: ...``, naming the turn and what is wrong with it.
    """
    if not isinstance(value, list) or not value:
        raise RowError(f"{where}: field {column!r} must be a non-empty list of turns "
                       "({role, content} or ShareGPT {from, value})",
                       WRONG_TYPE if not isinstance(value, list) else EMPTY_CONVERSATION)
    turns = [(i + 1, _turn(t, where, i + 1)) for i, t in enumerate(value)]
    counts = dropped if dropped is not None else Counter()
    start = int(turns[0][1]["role"] == "system")
    while len(turns) > start and turns[start][1]["role"] == "assistant":
        del turns[start]  # FastChat drops a first non-human turn; so do we, counted
        counts[LEADING_ASSISTANT] += 1
    _check_order(turns, start, where)
    if len(turns) > start and turns[-1][1]["role"] == "user":
        turns.pop()  # a last question with no answer teaches nothing
        counts[TRAILING_USER] += 1
    if len(turns) == start:
        raise RowError(f"{where}: no assistant turn (after dropping leading assistant and "
                       "trailing user turns); a conversation needs a user turn and its "
                       "answer to learn from", NO_EXCHANGE)
    messages = [m for _, m in turns]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"instruction": messages[last - 1]["content"], "context": "",
            "response": messages[last]["content"], "messages": messages}


def _turn(turn: Any, where: str, n: int) -> dict[str, str]:
    """One turn as ``{role, content}``; ``n`` counts turns from 1."""
    if not isinstance(turn, dict):
        raise RowError(f"{where}: turn {n} must be an object with role and content", BAD_TURN)
    sharegpt = "role" not in turn and "from" in turn
    got = turn.get("from") if sharegpt else turn.get("role")
    content = turn.get("value") if sharegpt else turn.get("content")
    if got is None:
        raise RowError(f"{where}: turn {n} has no role (give role/content, or ShareGPT's "
                       "from/value)", BAD_TURN)
    role = ROLE_ALIASES.get(str(got))
    if role is None:
        raise RowError(f"{where}: turn {n} has role {got!r}; use system, user or assistant "
                       "(or human; gpt, chatgpt, bing, bard)", UNKNOWN_ROLE)
    if not isinstance(content, str):
        raise RowError(f"{where}: turn {n} ({role}) has no text content (a string)", BAD_TURN)
    return {"role": role, "content": content}


def _check_order(turns: list[tuple[int, dict[str, str]]], start: int, where: str) -> None:
    """After ``start`` (1 past a system turn, else 0): user and assistant in turn, every
    answer non-empty. ``turns`` are ``(number in the file, turn)``."""
    for i, (n, m) in enumerate(turns[start:], start=start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != want:
            before = turns[i - 1][1]["role"] if i else None
            reason = ("a system turn after the first" if m["role"] == "system" else
                      f"two {m['role']} turns in a row" if before == m["role"] else
                      f"the conversation starts with an {m['role']} turn")
            raise RowError(f"{where}: turn {n}: {reason}; turns must be an optional "
                           "system turn, then user and assistant in turn", TURN_ORDER)
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError(f"{where}: turn {n} is an empty assistant turn; fill it in or "
                           "remove the row", EMPTY_ANSWER)


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
    truncation: str = "skip", min_response_tokens: int = 16,
) -> tuple[list[int], list[tuple[int, int]], bool]:
    """``(input_ids, spans, truncated)``: the assistant turns' spans that fit in
    ``cutoff_len``, the ids up to the end of the last of them (whole turns past it are
    dropped: ``truncated``); no ids when not even the first answer fits.

    With ``truncation="context"`` the first answer keeps ``min_response_tokens`` (or all
    of it, when shorter): the longest of the system and first user turns is shortened in
    its middle when they leave too little room, and the answer may be cut at
    ``cutoff_len`` (its span then ends there); no ids only when even that cannot fit."""
    messages, chat = row["messages"], chat_template_of(row, template)
    ids, spans = assistant_spans(tokenizer, messages, chat)
    shortened = False
    need = min(min_response_tokens, spans[0][1] - spans[0][0]) if spans else 0
    if truncation == "context" and spans and spans[0][0] + need > cutoff_len:
        fitted = _shorten_first_turns(tokenizer, messages, chat, cutoff_len - need)
        if fitted is None:
            return [], [], True
        ids, spans = assistant_spans(tokenizer, fitted, chat)
        shortened = True
    fitting = [s for s in spans if s[1] <= cutoff_len]
    if fitting:
        return ids[: fitting[-1][1]], fitting, shortened or len(fitting) < len(spans)
    if truncation == "context" and spans and spans[0][0] + need <= cutoff_len:
        return ids[:cutoff_len], [(spans[0][0], cutoff_len)], True  # the answer cut
    return [], [], True


def _shorten_first_turns(tokenizer: Any, messages: Sequence[Mapping[str, str]],
                         template: str, max_prompt: int) -> list[dict[str, str]] | None:
    """``messages`` with the longest of the system and first user turns cut to its start
    + :data:`TRUNCATION_MARKER` + its end, so that the text before the first answer takes
    at most ``max_prompt`` tokens; None when not even a token of that turn can stay."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    special = template != "chat"

    def prompt_len(turns: list[dict[str, str]]) -> int:
        text = render(tokenizer, turns[:first], template, True)
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    turns = [dict(m) for m in messages]
    sizes = {i: tokenizer(turns[i]["content"], add_special_tokens=False)["input_ids"]
             for i in range(first)}
    longest = max(sizes, key=lambda i: (len(sizes[i]), i))  # a tie: the user turn
    ids = sizes[longest]
    keep = len(ids) - (prompt_len(turns) - max_prompt)
    while keep > 0:  # the marker and re-tokenising at the cuts cost a few tokens: retry
        head, tail = keep - keep // 2, keep // 2
        text = tokenizer.decode(ids[:head]) + TRUNCATION_MARKER
        turns[longest] = {**turns[longest],
                          "content": text + (tokenizer.decode(ids[len(ids) - tail:]) if tail
                                             else "")}
        over = prompt_len(turns) - max_prompt
        if over <= 0:
            return turns
        keep -= over
    return None
