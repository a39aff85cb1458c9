"""Batched generation gives what one-at-a-time greedy decoding gives."""

from __future__ import annotations

import pytest
import torch

from fedit.data.batching import capped_batches
from fedit.data.prompts import build_prompt
from fedit.generate import generate_answers
from fedit.model import LoraSpec, attach_lora, load_base_model, load_tokenizer


@pytest.mark.parametrize("max_batch_tokens", [8192, 60])  # 60: some prompts go alone
def test_batched_greedy_equals_one_at_a_time(tiny_model_dir, tiny_rows, max_batch_tokens):
    tok = load_tokenizer(str(tiny_model_dir))
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"), LoraSpec(), 0)
    rows = tiny_rows[:6]  # prompts of different lengths: with and without context
    # Execute
    batched = generate_answers(model, tok, rows, max_new_tokens=8, batch_size=4,
                               max_batch_tokens=max_batch_tokens)
    # Assert: each equals plain greedy decoding of its prompt alone, by hand, no cache
    for row, answer in zip(rows, batched.answers, strict=True):
        ids = tok(build_prompt(row), return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(8):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                if nxt == tok.eos_token_id:
                    break
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        prompt_len = len(tok(build_prompt(row)).input_ids)
        assert answer == tok.decode(ids[0, prompt_len:], skip_special_tokens=True).strip()
    assert 0 < batched.new_tokens <= 6 * 8
    assert tok.padding_side == "right" and not model.training


def test_batches_keep_within_rows_and_tokens():
    lengths = [10, 12, 12, 30, 30, 100, 11]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # 0 6 1 2 3 4 5
    # 8 rows at most, 130 positions (padding included, 10 new tokens each) at most
    assert capped_batches(order, lengths, 8, 130, 10) == [[0, 6, 1, 2], [3, 4], [5]]
    # three rows at most; every row fits alone even when over the budget
    assert capped_batches(order, lengths, 3, 10_000, 10) == [[0, 6, 1], [2, 3, 4], [5]]
    assert capped_batches(order, lengths, 8, 5, 10) == [[i] for i in order]
