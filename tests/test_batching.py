"""Tokenise once, length-grouped batches, padding and label masks."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedit.data.batching import batch_order, collate, make_batches
from fedit.data.prompts import IGNORE_INDEX, Example


def _ex(n: int, prompt: int = 2) -> Example:
    ids = list(range(1, n + 1))
    return Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


def test_collate_pads_right_with_masked_labels():
    batch = collate([_ex(3), _ex(5)], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [[-100, -100, 3, -100, -100], [-100, -100, 3, 4, 5]]
    assert (batch.num_tokens, batch.num_labels, batch.num_examples) == (8, 4, 2)


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=200),
    batch_size=st.integers(1, 16),
    group=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_example_in_exactly_one_batch(lengths, batch_size, group, seed):
    batches = batch_order(lengths, batch_size, np.random.default_rng(seed), group)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)


def test_length_grouping_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=400).tolist()

    def padding(group: bool) -> int:
        order = batch_order(lengths, 8, np.random.default_rng(1), group)
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in order)

    assert padding(True) < 0.2 * padding(False)


def test_make_batches_is_seeded():
    examples = [_ex(n) for n in range(3, 40)]

    def run(seed):
        return [[len(e.input_ids) for e in b] for b in
                make_batches(examples, 4, rng=np.random.default_rng(seed))]

    assert run(5) == run(5)
    assert run(5) != run(6)
