"""Prompt building and masking."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fedit.data.prompts import IGNORE_INDEX, build_prompt, tokenize_row

ROW = {"instruction": "Name a bird.", "context": "", "response": "A robin."}
ROW_CTX = {"instruction": "Summarise.", "context": "The sky is blue.", "response": "Blue sky."}


def test_alpaca_prompt_matches_shepherd_text():
    # Execute
    no_input = build_prompt(ROW)
    with_input = build_prompt(ROW_CTX)
    # Assert: the exact alpaca-lora / Shepherd strings
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a bird.\n\n### Response:\n"
    )
    assert with_input.endswith(
        "### Instruction:\nSummarise.\n\n### Input:\nThe sky is blue.\n\n### Response:\n"
    )
    assert with_input.startswith("Below is an instruction that describes a task, paired with")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_prompt_tokens_masked_response_kept_eos_last(tiny_model_dir, template):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = tokenize_row(tok, ROW_CTX, template=template, cutoff_len=512)
    prompt_ids = tok(build_prompt(ROW_CTX, template, tok), add_special_tokens=template != "chat")[
        "input_ids"
    ]
    n = len(prompt_ids)
    assert ex.input_ids[:n] == prompt_ids
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n:-1]) == ROW_CTX["response"]


def test_train_on_inputs_keeps_every_label(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = tokenize_row(tok, ROW, train_on_inputs=True)
    assert ex.labels == ex.input_ids
    assert ex.num_labels == len(ex.input_ids)


def test_cutoff_truncates_and_drops_eos(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = tokenize_row(tok, ROW_CTX, cutoff_len=10_000)
    # skip: the row as it is, its response cut at the end (context would shorten the context)
    cut = tokenize_row(tok, ROW_CTX, cutoff_len=len(full.input_ids) - 3, truncation="skip")
    assert len(cut.input_ids) == len(full.input_ids) - 3
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert cut.input_ids[-1] != tok.eos_token_id


def test_unknown_template_is_named():
    with pytest.raises(ValueError, match="unknown prompt template 'vicuna'"):
        build_prompt(ROW, "vicuna")
