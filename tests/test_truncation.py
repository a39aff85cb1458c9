"""data.truncation: rows too long for data.cutoff_len are shortened, not dropped silently."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from fedit.data.batching import tokenize_for_run
from fedit.data.prompts import IGNORE_INDEX, TRUNCATION_MARKER, build_prompt, tokenize_row

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron"
LONG_CONTEXT = {"instruction": "Summarise the notes.", "context": " ".join([WORDS] * 20),
                "response": " ".join([WORDS] * 3)}
LONG_INSTRUCTION = {"instruction": " ".join([WORDS] * 20), "context": "",
                    "response": " ".join([WORDS] * 3)}
SHORT = {"instruction": "Name a bird.", "context": "", "response": "A robin."}


def _data(truncation: str = "context", cutoff_len: int = 200, min_response_tokens: int = 16):
    return SimpleNamespace(template="alpaca", cutoff_len=cutoff_len, train_on_inputs=False,
                           truncation=truncation, min_response_tokens=min_response_tokens)


@pytest.fixture
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_long_context_is_shortened_and_keeps_the_instruction(tok):
    # Prepare: the prompt alone is longer than the cutoff
    assert len(tok(build_prompt(LONG_CONTEXT)).input_ids) > 200
    # Execute
    ex = tokenize_row(tok, LONG_CONTEXT, cutoff_len=200, min_response_tokens=16)
    # Assert: it fits, 16 response tokens carry a label, the instruction is intact and the
    # context kept its start and end around the marker
    text = tok.decode(ex.input_ids)
    assert ex.truncated and len(ex.input_ids) <= 200
    assert ex.num_labels >= 16
    assert "### Instruction:\nSummarise the notes.\n\n### Input:\nalpha" in text
    assert TRUNCATION_MARKER in text
    assert "omicron\n\n### Response:\nalpha beta" in text
    response = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(response).startswith("alpha beta gamma")


def test_long_instruction_is_shortened_the_same_way(tok):
    ex = tokenize_row(tok, LONG_INSTRUCTION, cutoff_len=200, min_response_tokens=16)
    text = tok.decode(ex.input_ids)
    assert ex.truncated and len(ex.input_ids) <= 200 and ex.num_labels >= 16
    assert "### Instruction:\nalpha" in text and TRUNCATION_MARKER in text
    assert "omicron\n\n### Response:\n" in text


def test_short_response_fits_whole(tok):
    # a response shorter than min_response_tokens: all of it (and EOS) fits
    ex = tokenize_row(tok, {**LONG_CONTEXT, "response": "A robin."}, cutoff_len=200)
    n = len(tok("A robin.", add_special_tokens=False).input_ids) + 1
    assert ex.num_labels == n and ex.input_ids[-1] == tok.eos_token_id


def test_rows_that_fit_are_unchanged(tok):
    assert tokenize_row(tok, SHORT, cutoff_len=200) == tokenize_row(
        tok, SHORT, cutoff_len=200, truncation="skip")


def test_counts_logged_and_recorded(tok, tmp_path):
    rows = [SHORT, LONG_CONTEXT, LONG_INSTRUCTION, SHORT]
    logs: list[str] = []
    stats = tmp_path / "data_stats.json"
    # Execute: context keeps all four; skip drops the two long ones
    kept_ctx = tokenize_for_run(tok, rows, _data(), "client 0", logs.append, stats)[1]
    kept_skip = tokenize_for_run(tok, rows, _data("skip"), "client 1", logs.append, stats)[1]
    # Assert
    assert kept_ctx == [0, 1, 2, 3] and kept_skip == [0, 3]
    assert logs == [
        "client 0: 2 of 4 rows shortened to fit data.cutoff_len = 200 (a context or "
        "instruction lost its middle, or a conversation its last turns)",
        "client 1: 2 of 4 rows skipped: the prompt alone fills data.cutoff_len = 200, leaving "
        "no response token",
    ]
    assert json.loads(stats.read_text())["length"] == {
        "client 0": {"rows": 4, "truncated": 2, "skipped": 0},
        "client 1": {"rows": 4, "truncated": 0, "skipped": 2},
        "total": {"rows": 8, "truncated": 2, "skipped": 2},
    }


def test_a_template_longer_than_the_cutoff_still_skips(tok):
    # not even one instruction token fits: nothing to shorten, the row is skipped
    examples, kept = tokenize_for_run(tok, [LONG_INSTRUCTION], _data(cutoff_len=60), "x", None)
    assert examples == [] and kept == []


@pytest.mark.parametrize("template", ["chat", "chatml"])
def test_chat_templates_shorten_the_context_too(tok, template):
    ex = tokenize_row(tok, LONG_CONTEXT, template=template, cutoff_len=120)
    text = tok.decode(ex.input_ids)
    assert ex.truncated and len(ex.input_ids) <= 120 and ex.num_labels >= 16
    assert "Summarise the notes.\n\nalpha" in text and TRUNCATION_MARKER in text


def _chat(first_user: str, system: str = "", answer: str = " ".join([WORDS] * 3)) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": [*turns, {"role": "user", "content": first_user},
                         {"role": "assistant", "content": answer},
                         {"role": "user", "content": "And a fish?"},
                         {"role": "assistant", "content": "A trout."}]}


def _turn_text(text: str, role: str) -> str:
    return text.split(f"<|im_start|>{role}\n", 1)[1].split("<|im_end|>", 1)[0]


def test_a_long_first_user_turn_is_shortened_so_the_conversation_is_kept(tok):
    # Prepare: the first user turn alone is longer than the cutoff
    row = _chat("Start here. " + " ".join([WORDS] * 20) + " End here.")
    assert tokenize_row(tok, row, template="chatml", cutoff_len=120,
                        truncation="skip").num_labels == 0  # skipped, as before
    # Execute
    ex = tokenize_row(tok, row, template="chatml", cutoff_len=120, min_response_tokens=16)
    # Assert: it fits; the user turn kept its start and end around " [...] "; the answer
    # starts right after the prompt and keeps at least 16 labelled tokens (cut at the
    # cutoff, no end marker); the second exchange is gone
    text = tok.decode(ex.input_ids)
    user = _turn_text(text, "user")
    assert ex.truncated and len(ex.input_ids) == 120
    assert user.startswith("Start here. alpha beta") and user.endswith("omicron End here.")
    assert user.count(TRUNCATION_MARKER) == 1
    labelled = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    assert 16 <= ex.num_labels <= 16 + 4  # just enough was cut (the marker costs a few)
    assert tok.decode(labelled).startswith("alpha beta gamma")
    assert ex.labels[-len(labelled):] == labelled  # the answer runs to the cutoff
    assert "And a fish?" not in text and "<|im_end|>" not in tok.decode(labelled)


def test_the_longer_of_system_and_first_user_turn_is_the_one_shortened(tok):
    row = _chat("Name a bird.", system="Rules: " + " ".join([WORDS] * 20), answer="A robin.")
    ex = tokenize_row(tok, row, template="chatml", cutoff_len=100, min_response_tokens=16)
    text = tok.decode(ex.input_ids)
    assert ex.truncated and len(ex.input_ids) <= 100
    assert TRUNCATION_MARKER in _turn_text(text, "system")
    assert _turn_text(text, "user") == "Name a bird."
    # an answer shorter than min_response_tokens is kept whole, with its end marker
    labelled = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(labelled).startswith("A robin.<|im_end|>")


def test_shortened_conversations_are_counted_as_truncated(tok, tmp_path):
    long = " ".join([WORDS] * 20)
    rows = [_chat("Name a bird.", answer="A robin."),  # fits whole
            _chat("Name a bird."),  # its long first answer is cut at the cutoff
            _chat(long),  # its first user turn is shortened
            _chat(long, system=long)]  # shortening the longer turn is not enough: skipped
    data = SimpleNamespace(template="chatml", cutoff_len=120, train_on_inputs=False,
                           truncation="context", min_response_tokens=16)
    stats = tmp_path / "data_stats.json"
    examples, kept = tokenize_for_run(tok, rows, data, "c", None, stats)
    assert kept == [0, 1, 2] and [e.truncated for e in examples] == [False, True, True]
    assert json.loads(stats.read_text())["length"]["c"] == {"rows": 4, "truncated": 2,
                                                            "skipped": 1}
