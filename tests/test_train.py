"""The local trainer and the loss it optimises, checked against transformers' own loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedit.client.fused import fused_training
from fedit.client.losses import evaluate_loss, example_losses, token_losses
from fedit.client.trainer import train_adapter
from fedit.config import TrainConfig
from fedit.data.batching import collate, tokenize_rows
from fedit.model.adapter import adapter_names, get_adapter_arrays
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer


@pytest.fixture
def tiny(tiny_model_dir, tiny_rows):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_base_model(str(tiny_model_dir), dtype=torch.float32)
    model = attach_lora(model, LoraSpec(dropout=0.0), seed=0)
    examples = tokenize_rows(tok, tiny_rows, cutoff_len=128)
    return tok, model, examples


def _perturb_lora_b(model, scale=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def test_token_loss_equals_transformers_loss(tiny):
    tok, model, examples = tiny
    _perturb_lora_b(model)
    batch = collate(examples[:6], tok.pad_token_id)
    losses, rows = token_losses(model, batch)
    with torch.no_grad():
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    labels=batch.labels).loss
    assert losses.shape[0] == batch.num_labels
    assert sorted(set(rows.tolist())) == list(range(6))
    torch.testing.assert_close(losses.mean().detach(), ref, rtol=1e-5, atol=1e-6)


def test_example_losses_do_not_depend_on_batching(tiny):
    tok, model, examples = tiny
    _perturb_lora_b(model)
    sums_1, counts_1 = example_losses(model, examples[:10], batch_size=1, pad_id=tok.pad_token_id)
    sums_8, counts_8 = example_losses(model, examples[:10], batch_size=8, pad_id=tok.pad_token_id)
    np.testing.assert_array_equal(counts_1, counts_8)
    np.testing.assert_allclose(sums_1, sums_8, rtol=1e-4)
    assert counts_1.tolist() == [e.num_labels - (e.labels[0] != -100) for e in examples[:10]]
    mean = evaluate_loss(model, examples[:10], 4, tok.pad_token_id)
    assert mean == pytest.approx(sums_1.sum() / counts_1.sum(), rel=1e-5)


def test_micro_batches_give_the_same_step(tiny):
    tok, model, examples = tiny
    _perturb_lora_b(model)  # so lora_A gets a gradient too
    other = copy.deepcopy(model)
    base = dict(batch_size=8, lr=1e-3, max_steps=2, group_by_length=False)
    train_adapter(model, examples[:16], TrainConfig(**base, micro_batch_size=8),
                  pad_id=tok.pad_token_id, seed=3)
    train_adapter(other, examples[:16], TrainConfig(**base, micro_batch_size=2),
                  pad_id=tok.pad_token_id, seed=3)
    for a, b in zip(get_adapter_arrays(model), get_adapter_arrays(other), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_compiled_layers_train_the_same_adapter(tiny):
    # Length-grouped batches of several lengths: dynamic shapes, no recompile per length
    tok, model, examples = tiny
    _perturb_lora_b(model)
    other = copy.deepcopy(model)
    base = dict(batch_size=8, micro_batch_size=8, lr=1e-3, max_steps=4)
    eager = train_adapter(model, examples[:32], TrainConfig(**base), pad_id=tok.pad_token_id,
                          seed=3)
    compiled = train_adapter(other, examples[:32], TrainConfig(**base, compile=True),
                             pad_id=tok.pad_token_id, seed=3)
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-4)
    for a, b in zip(get_adapter_arrays(model), get_adapter_arrays(other), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    layers = other.get_base_model().model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)  # eager outside training
    assert evaluate_loss(other, examples[:8], 8, tok.pad_token_id) == pytest.approx(
        evaluate_loss(model, examples[:8], 8, tok.pad_token_id), rel=1e-4)


def test_training_lowers_the_loss_and_reports(tiny):
    tok, model, examples = tiny
    before = evaluate_loss(model, examples, 16, tok.pad_token_id)
    seen = []
    cfg = TrainConfig(local_epochs=5, batch_size=8, micro_batch_size=4, lr=2e-2)
    result = train_adapter(model, examples, cfg, pad_id=tok.pad_token_id, seed=0,
                           progress=lambda s, t, loss: seen.append((s, t)))
    after = evaluate_loss(model, examples, 16, tok.pad_token_id)
    assert after < before - 0.3, (before, after)
    assert result.steps == 5 * int(np.ceil(len(examples) / 8)) == len(seen)
    assert seen[-1] == (result.steps, result.steps)
    assert result.num_examples == len(examples)
    assert result.tokens == 5 * sum(len(e.input_ids) for e in examples)
    assert np.isfinite(result.train_loss)


def test_max_steps_caps_a_round(tiny):
    tok, model, examples = tiny
    cfg = TrainConfig(local_epochs=5, batch_size=4, micro_batch_size=4, max_steps=3)
    assert train_adapter(model, examples, cfg, pad_id=tok.pad_token_id).steps == 3


def test_only_lora_changes(tiny):
    tok, model, examples = tiny
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_adapter(model, examples[:8], TrainConfig(batch_size=4, micro_batch_size=4, lr=1e-2),
                  pad_id=tok.pad_token_id)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.slow
def test_one_smollm2_client_step(smollm2_cache, monkeypatch):
    """One real client round on SmolLM2 with two dolly-like rows: one optimizer step."""
    from fedit.client.round import run_client_round

    monkeypatch.setenv("FEDIT_CACHE", str(smollm2_cache[0]))
    tok = load_tokenizer("smollm2-135m")
    model = attach_lora(load_base_model("smollm2-135m"), LoraSpec(), seed=0)
    rows = [
        {"instruction": "What is the capital of France?", "context": "", "response": "Paris."},
        {"instruction": "Summarise.", "context": "Bees make honey from nectar.",
         "response": "Bees turn nectar into honey."},
    ]
    examples = tokenize_rows(tok, rows, cutoff_len=128)
    start = get_adapter_arrays(model)
    before = evaluate_loss(model, examples, 2, tok.pad_token_id)
    reply = run_client_round(
        model, start, examples, TrainConfig(batch_size=2, micro_batch_size=1, lr=1e-3),
        client=3, server_round=1, seed=0, pad_id=tok.pad_token_id,
    )
    assert reply.client == 3 and reply.num_examples == 2
    assert reply.metrics["steps"] == 1
    # The pretrained model already knows this: a low loss, and one step moves only B
    assert 0.1 < reply.metrics["train-loss"] < 4
    assert reply.metrics["train-loss"] == pytest.approx(before, rel=0.1)  # LoRA dropout aside
    changed = [not np.array_equal(a, b) for a, b in zip(start, reply.arrays, strict=True)]
    names = adapter_names(model)
    assert all(c == ("lora_B" in n) for c, n in zip(changed, names, strict=True))


def test_lora_gradients_match_the_reference_recipe(tiny_model_dir, tiny_rows):
    """fp32: fedit's loss path (no attention mask, lm_head only where labelled; stock or
    fused kernels) gives the gradients of transformers' own loss with the padded batch and
    its mask (the reference recipe), on the same data from the same init, to 1e-4 relative."""
    tok = load_tokenizer(str(tiny_model_dir))
    examples = tokenize_rows(tok, tiny_rows[:8], cutoff_len=256, train_on_inputs=True)
    batch = collate(examples, tok.pad_token_id)
    assert batch.attention_mask.min() == 0  # the batch really is padded

    def grads(loss_fn, fused=False):
        model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"),
                            LoraSpec(dropout=0.0), seed=0).train()
        _perturb_lora_b(model)
        with fused_training(model, enabled=fused):
            loss_fn(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = grads(lambda m: m(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            labels=batch.labels).loss)
    for fused in (False, True):  # fedit's loss on the stock modules, and on the fused kernels
        ours = grads(lambda m: token_losses(m, batch)[0].mean(), fused=fused)
        assert ours.keys() == ref.keys() and len(ours) == 16
        for name in ours:
            scale = ref[name].abs().max()
            assert scale > 0, name
            assert (ours[name] - ref[name]).abs().max() <= 1e-4 * scale, (fused, name)


def test_bf16_base_trains_to_within_2_percent_of_fp32(tiny_model_dir, tiny_rows):
    """The fast path (bf16 base weights, fp32 LoRA) ends one local epoch at the fp32 loss."""
    tok = load_tokenizer(str(tiny_model_dir))
    train, held_out = tiny_rows[:48], tiny_rows[48:]
    train_ex = tokenize_rows(tok, train, cutoff_len=256)
    test_ex = tokenize_rows(tok, held_out, cutoff_len=256)

    def held_out_loss(dtype):
        model = attach_lora(load_base_model(str(tiny_model_dir), dtype=dtype), LoraSpec(), 0)
        cfg = TrainConfig(batch_size=8, micro_batch_size=8, lr=2e-2)
        train_adapter(model, train_ex, cfg, pad_id=tok.pad_token_id, seed=0)
        return evaluate_loss(model, test_ex, 16, tok.pad_token_id)

    fp32, bf16 = held_out_loss("fp32"), held_out_loss("bf16")
    assert bf16 == pytest.approx(fp32, rel=0.02)


# -- the trainer hook (FedProx's proximal term, SCAFFOLD's correction go through it) ---------
class Recording:
    """A TrainHook that records what the trainer hands it."""

    def __init__(self, zero_grads=False, mu=0.0, start=None):
        self.calls, self.zero_grads, self.mu, self.start = [], zero_grads, mu, start

    def loss(self, params):
        self.calls.append(("loss", [tuple(p.shape) for p in params],
                           [p.grad is not None for p in params]))
        return 0.5 * self.mu * sum(((p - s) ** 2).sum() for p, s in zip(params, self.start,
                                                                          strict=True))

    def correct(self, params):
        self.calls.append(("correct", [tuple(p.shape) for p in params],
                           [p.grad is not None for p in params]))
        if self.zero_grads:
            for p in params:
                p.grad.zero_()


def _hook(**kw):
    from fedit.algorithms.strategies import TrainHook

    return type("Hook", (Recording, TrainHook), {})(**kw)


@pytest.mark.parametrize("fused", [True, False])
def test_hook_sees_the_adapter_once_a_step_after_backward(tiny, fused):
    tok, model, examples = tiny
    start = [torch.tensor(a) for a in get_adapter_arrays(model)]
    hook = _hook(start=start)
    cfg = TrainConfig(batch_size=4, micro_batch_size=2, max_steps=3, fused=fused)
    train_adapter(model, examples[:12], cfg, pad_id=tok.pad_token_id, seed=0, hook=hook)
    shapes = [a.shape for a in get_adapter_arrays(model)]
    # loss then correct, once per optimizer step, on the adapter's tensors in wire order
    assert [c[0] for c in hook.calls] == ["loss", "correct"] * 3
    assert all(c[1] == shapes for c in hook.calls)
    assert all(all(c[2]) for c in hook.calls if c[0] == "correct")  # after backward


@pytest.mark.parametrize("fused", [True, False])
def test_a_correction_that_zeroes_the_gradient_stops_training(tiny, fused):
    tok, model, examples = tiny
    before = get_adapter_arrays(model)
    cfg = TrainConfig(batch_size=4, micro_batch_size=4, max_steps=3, fused=fused)
    train_adapter(model, examples[:12], cfg, pad_id=tok.pad_token_id, seed=0,
                  hook=_hook(zero_grads=True, start=[torch.tensor(a) for a in before]))
    # AdamW with zero gradients and no weight decay moves nothing
    for a, b in zip(get_adapter_arrays(model), before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fused", [True, False])
def test_a_proximal_term_keeps_the_adapter_near_its_start(tiny, fused):
    tok, model, examples = tiny
    before = get_adapter_arrays(model)
    cfg = TrainConfig(batch_size=4, micro_batch_size=4, max_steps=4, lr=1e-2, fused=fused,
                      lr_scheduler="constant", max_grad_norm=0.0)

    def distance(mu):
        """How far training moves the adapter: with a proximal term mu, or no hook (None)."""
        from fedit.model.adapter import set_adapter_arrays

        set_adapter_arrays(model, before)
        hook = None if mu is None else _hook(mu=mu, start=[torch.tensor(a) for a in before])
        train_adapter(model, examples[:16], cfg, pad_id=tok.pad_token_id, seed=0, hook=hook)
        return sum(float(((a - b) ** 2).sum())
                   for a, b in zip(get_adapter_arrays(model), before, strict=True)) ** 0.5

    free, zero, pulled = distance(None), distance(0.0), distance(1e4)
    assert zero == pytest.approx(free, rel=1e-6)  # mu = 0: the same training as no hook
    assert pulled < 0.5 * free
