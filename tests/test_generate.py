"""Batched generation gives what one-at-a-time greedy decoding gives."""

from __future__ import annotations

import pytest
import torch

from fedit.data.batching import capped_batches
from fedit.data.prompts import TEMPLATE_STOPS, build_prompt
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
from fedit.model.generate import cut_at_stops, generate_answers


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


class _RunsOn(torch.nn.Module):
    """The tiny model made to answer a scripted text token by token (whatever it would say),
    running on into a new alpaca section."""

    def __init__(self, model, tok, continuation):
        super().__init__()
        self.model, self.calls = model, 0
        self.script = tok(continuation, add_special_tokens=False)["input_ids"]

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        out.logits = torch.full_like(out.logits, -1e9)
        out.logits[..., token] = 0
        return out


def test_answers_stop_at_the_templates_markers(tiny_model_dir, tiny_rows):
    tok = load_tokenizer(str(tiny_model_dir))
    text = "Paris is the capital.\n\n### Instruction:\nName a river."
    model = _RunsOn(load_base_model(str(tiny_model_dir), dtype="fp32"), tok, text)
    # Execute
    out = generate_answers(model, tok, tiny_rows[:2], max_new_tokens=32)
    # Assert: what it ran on with is cut off, and decoding stopped at the marker
    assert out.answers == ["Paris is the capital."] * 2
    marker = len(tok(text[: text.index(":") + 1], add_special_tokens=False)["input_ids"])
    assert model.calls <= marker + 1 < len(model.script)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a ### Input: b ### Instruction: c", "a "), ("no marker", "no marker"), ("", "")],
)
def test_cut_at_stops(text, expected):
    assert cut_at_stops(text, TEMPLATE_STOPS["alpaca"]) == expected
