"""The MT-Bench judge prompts (single-answer grading and pairwise comparison) and the
parsers of their verdicts, ``[[N]]`` and ``[[A]]`` / ``[[B]]`` / ``[[C]]``."""

from __future__ import annotations

import re
from typing import Any

# The MT-Bench judge prompts of FastChat's llm_judge/data/judge_prompts.jsonl (Apache-2.0):
# pair-v2, pair-math-v1, single-v1 and single-math-v1 put together from their shared
# sentences; tests/test_judge.py checks the result against the verbatim text.
_PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by "
    "two AI assistants to the user question displayed below. {criteria}Avoid any positional "
    "biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your "
    "evaluation. Do not favor certain names of the assistants. Be as objective as possible. "
    "After providing your explanation, output your final verdict by strictly following this "
    'format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" '
    "for a tie."
)
_PAIR_V2_CRITERIA = (
    "You should choose the assistant that follows the user's instructions and answers the "
    "user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin "
    "your evaluation by comparing the two responses and provide a short explanation. "
)
_PAIR_MATH_CRITERIA = (
    "Your evaluation should consider correctness and helpfulness. You will be given a "
    "reference answer, assistant A's answer, and assistant B's answer. Your job is to "
    "evaluate which assistant's answer is better. Begin your evaluation by comparing both "
    "assistants' answers with the reference answer. Identify and correct any mistakes. "
)
_SINGLE_HEAD = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. {criteria}Be as "
    "objective as possible. After providing your explanation, you must rate the response on a "
    'scale of 1 to 10 by strictly following this format: "[[rating]]", for example: '
    '"Rating: [[5]]".\n\n[Question]\n{question}\n\n'
)
_SINGLE_V1_CRITERIA = (
    "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, "
    "depth, creativity, and level of detail of the response. Begin your evaluation by "
    "providing a short explanation. "
)
_SINGLE_MATH_CRITERIA = (
    "Your evaluation should consider correctness and helpfulness. You will be given a "
    "reference answer and the assistant's answer. Begin your evaluation by comparing the "
    "assistant's answer with the reference answer. Identify and correct any mistakes. "
)
_REF = "[The Start of Reference Answer]\n{ref}\n[The End of Reference Answer]\n\n"
_ANSWER = "[The Start of Assistant{who} Answer]\n{answer}\n[The End of Assistant{who} Answer]"
PROMPT_NAMES = {("single", True): "single-math-v1", ("single", False): "single-v1",
                ("pairwise", True): "pair-math-v1", ("pairwise", False): "pair-v2"}

_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def question_text(row: dict[str, Any]) -> str:
    """The user question a judge sees: the instruction, then the context when there is one."""
    context = str(row.get("context") or "").strip()
    return row["instruction"] + (f"\n\n[Context]\n{context}" if context else "")


def single_messages(row: dict[str, Any], reference: bool = True) -> list[dict[str, str]]:
    """MT-Bench single-answer grading prompt (single-math-v1 with the reference answer)."""
    criteria = _SINGLE_MATH_CRITERIA if reference else _SINGLE_V1_CRITERIA
    text = _SINGLE_HEAD.format(criteria=criteria, question=question_text(row))
    if reference:
        text += _REF.format(ref=row.get("reference", ""))
    text += _ANSWER.format(who="'s", answer=row["answer"])
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text}]


def pairwise_messages(row: dict[str, Any], answer_a: str, answer_b: str,
                      reference: bool = True) -> list[dict[str, str]]:
    """MT-Bench pairwise prompt (pair-math-v1 with the reference answer, else pair-v2)."""
    criteria = _PAIR_MATH_CRITERIA if reference else _PAIR_V2_CRITERIA
    text = f"[User Question]\n{question_text(row)}\n\n"
    if reference:
        text += _REF.format(ref=row.get("reference", ""))
    text += _ANSWER.format(who=" A's", answer=answer_a) + "\n\n"
    text += _ANSWER.format(who=" B's", answer=answer_b)
    return [{"role": "system", "content": _PAIR_SYSTEM.format(criteria=criteria)},
            {"role": "user", "content": text}]


def parse_rating(reply: str) -> float | None:
    """The last ``[[N]]`` in a reply when 1 <= N <= 10 (the judge's final rating), else None."""
    found = _RATING.findall(reply or "")
    score = float(found[-1]) if found else None
    return score if score is not None and 1 <= score <= 10 else None


def parse_verdict(reply: str) -> str | None:
    """The last ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie) in a reply, else None."""
    found = _VERDICT.findall(reply or "")
    return found[-1] if found else None
