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
