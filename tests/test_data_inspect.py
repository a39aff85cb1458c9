"""The data set summary: field and label counts, char and token length percentiles."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from fedit.data.inspect import format_inspect, inspect_rows, percentiles
from fedit.data.prompts import build_prompt

ROWS = [
    {"instruction": "Name a bird.", "context": "", "response": "A robin.", "category": "qa"},
    {"instruction": "Sum.", "context": "1 and 2", "response": "3", "category": "math"},
    {"instruction": "Name a fish.", "context": "", "response": "A cod.", "category": "qa"},
    {"instruction": "Say hi.", "context": "", "response": "Hi!", "category": " "},
]


def test_percentiles_are_observed_values():
    # inverted_cdf: the smallest value with at least q% of the values at or below it
    values = list(range(1, 101))  # 1..100
    assert percentiles(values) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


def test_counts_fields_and_labels():
    report = inspect_rows(ROWS)
    assert report["rows"] == 4
    # context is non-empty in one row; the blank category in none of the last
    assert report["fields"] == {"category": 3, "context": 1, "instruction": 4, "response": 4}
    assert report["labels"] == {"qa": 2, " ": 1, "math": 1}
    assert list(report["labels"]) == ["qa", " ", "math"]  # most common first, then by name
    assert report["label_field"] == "category"
    assert report["tokens"] is None


def test_no_label_field_gives_no_labels():
    assert inspect_rows(ROWS, label_field="source")["labels"] is None
    assert inspect_rows(ROWS, label_field=None)["labels"] is None


def test_char_lengths_match_a_direct_computation(tiny_rows):
    # Prepare
    texts = [build_prompt(r) + r["response"] for r in tiny_rows]
    lengths = np.array([len(t) for t in texts])
    responses = np.array([len(r["response"]) for r in tiny_rows])
    # Execute
    chars = inspect_rows(tiny_rows)["chars"]
    # Assert
    assert chars["text"]["max"] == lengths.max()
    assert chars["text"]["p50"] == int(np.sort(lengths)[int(np.ceil(0.5 * len(lengths))) - 1])
    assert chars["text"]["p90"] == int(np.sort(lengths)[int(np.ceil(0.9 * len(lengths))) - 1])
    assert chars["response"]["max"] == responses.max()
    assert chars["context"]["p50"] == 0  # 3 rows in 4 have no context


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_token_lengths_match_a_direct_computation(tiny_model_dir, tiny_rows, template):
    # Prepare
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    special = template == "alpaca"
    lengths = sorted(
        len(
            tok(build_prompt(r, template, tok) + r["response"], add_special_tokens=special)[
                "input_ids"
            ]
        )
        + 1  # + EOS
        for r in tiny_rows
    )
    # Execute
    tokens = inspect_rows(tiny_rows, tokenizer=tok, template=template)["tokens"]
    # Assert
    n = len(lengths)
    assert tokens == {
        "p50": lengths[int(np.ceil(0.5 * n)) - 1],
        "p90": lengths[int(np.ceil(0.9 * n)) - 1],
        "p99": lengths[int(np.ceil(0.99 * n)) - 1],
        "max": lengths[-1],
    }


def test_format_inspect_shows_every_number(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    report = inspect_rows(ROWS, tokenizer=tok)
    text = format_inspect(report)
    lines = text.splitlines()
    assert lines[0] == "rows: 4"
    assert any(line.split() == ["context", "1"] for line in lines)
    assert any(line.split() == ["qa", "2", "50.0%"] for line in lines)
    token_line = next(line for line in lines if line.strip().startswith("text (tokens)"))
    assert token_line.split()[-4:] == [
        str(report["tokens"][k]) for k in ("p50", "p90", "p99", "max")
    ]
    assert "labels (category):" in text
