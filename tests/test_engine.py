"""The batching engine in-process: batched answers equal one-at-a-time answers (greedy)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fedit.model.adapter import get_adapter_arrays, save_adapter, set_adapter_arrays
from fedit.model.base import LoraSpec, attach_lora, load_base_model, load_tokenizer
from fedit.model.engine import Engine, Event, Job, Sampling, _first_stop, _safe_end
from fedit.serve.adapters import AdapterCache, wrap_with_adapter

NAMES = ["x", "y", "z"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    """Three adapters with large random weights (each changes the answers), and the base."""
    out = tmp_path_factory.mktemp("engine-adapters")
    lm = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"), LoraSpec(), seed=0)
    found = {"base": None}
    for i, name in enumerate(NAMES):
        rng = np.random.default_rng(i)
        set_adapter_arrays(lm, [rng.normal(0, 0.4, a.shape) for a in get_adapter_arrays(lm)])
        found[name] = save_adapter(lm, out / name, base_model=str(tiny_model_dir))
    return found


def _engine(tiny_model_dir, folders, max_batch, max_loaded=8):
    tok = load_tokenizer(str(tiny_model_dir))
    base = load_base_model(str(tiny_model_dir), dtype="fp32")
    lm = wrap_with_adapter(base, folders["x"])
    return Engine(lm, tok, AdapterCache(lm, folders, max_loaded, {"x": "a0"}),
                  max_batch=max_batch)


class Answer:
    """Collects one job's events; ``done`` is set by its last one."""

    def __init__(self) -> None:
        self.text, self.end, self.done = "", None, threading.Event()
        self.started = threading.Event()  # the first event came

    def __call__(self, event: Event) -> None:
        self.started.set()
        if event.kind == "delta":
            self.text += event.text
        else:
            self.end = event
            self.done.set()


def _jobs(tok):
    prompts = ["Once upon a time", "Write a poem about the sea and the sky",
               "a", "Explain, in detail, why rivers flow to the sea"]
    jobs = []
    for i in range(8):
        ids = tok(prompts[i % 4])["input_ids"]
        model = (["base"] + NAMES)[i % 4 if i < 4 else (i + 1) % 4]
        jobs.append((ids, model, Sampling(max_tokens=4 + 3 * (i % 3), temperature=0,
                                          ignore_eos=i % 2 == 0)))
    return jobs


def _run(engine, jobs, start_with=None):
    answers = []
    for ids, model, sampling in jobs:
        answer = Answer()
        answers.append(answer)
        engine.submit(Job(ids, model, sampling, answer))
        if start_with is not None and len(answers) == start_with:
            engine.start()
            assert answers[0].started.wait(60)  # decoding: the next jobs join a running batch
    if start_with is None:
        engine.start()
    for a in answers:
        assert a.done.wait(60)
    engine.stop()
    return [(a.text, a.end.finish_reason, a.end.completion_tokens) for a in answers]


def _reference(tiny_model_dir, folders, jobs):
    """Each job alone through transformers' own generate with its adapter (no engine)."""
    from peft import PeftModel

    tok = load_tokenizer(str(tiny_model_dir))
    base = load_base_model(str(tiny_model_dir), dtype="fp32")
    base.config.use_cache = True
    out = []
    for ids, model, sampling in jobs:
        lm = base if folders[model] is None else PeftModel.from_pretrained(base, folders[model])
        with torch.inference_mode():
            gen = lm.generate(input_ids=torch.tensor([ids]), max_new_tokens=sampling.max_tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=None if sampling.ignore_eos else tok.eos_token_id)
        new = gen[0, len(ids):].tolist()
        if folders[model] is not None:
            base = lm.unload()
        if not sampling.ignore_eos and tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id) + 1]
        out.append((tok.decode(new, skip_special_tokens=True), len(new)))
    return out


def test_batched_answers_equal_one_at_a_time_and_generate(tiny_model_dir, folders):
    tok = load_tokenizer(str(tiny_model_dir))
    jobs = _jobs(tok)
    batched_engine = _engine(tiny_model_dir, folders, max_batch=8)
    batched = _run(batched_engine, jobs)
    assert batched_engine.max_rows_seen == 8  # every request in one batch at first
    alone = _run(_engine(tiny_model_dir, folders, max_batch=1), jobs)
    assert batched == alone
    reference = _reference(tiny_model_dir, folders, jobs)
    assert [(t, n) for t, _, n in batched] == reference
    assert len({t for t, _, _ in batched}) > 4  # the adapters make the answers differ
    for (_, _, sampling), (_, reason, n) in zip(jobs, batched, strict=True):
        assert n <= sampling.max_tokens
        assert reason == ("length" if n == sampling.max_tokens else "stop")


def test_requests_joining_a_running_batch_decode_the_same(tiny_model_dir, folders):
    tok = load_tokenizer(str(tiny_model_dir))
    jobs = _jobs(tok)
    first = (tok("go")["input_ids"], "z", Sampling(max_tokens=40, temperature=0,
                                                    ignore_eos=True))
    jobs = [first, *jobs]
    engine = _engine(tiny_model_dir, folders, max_batch=4)
    joined = _run(engine, jobs, start_with=1)  # the rest arrive while the first decodes
    alone = _run(_engine(tiny_model_dir, folders, max_batch=1), jobs)
    assert joined == alone
    assert engine.max_rows_seen == 4


def test_lru_keeps_at_most_the_bound_and_reloads(tiny_model_dir, folders):
    tok = load_tokenizer(str(tiny_model_dir))
    jobs = [(tok("hi")["input_ids"], m, Sampling(max_tokens=3, temperature=0))
            for m in ["x", "y", "z", "x", "y", "base"]]
    engine = _engine(tiny_model_dir, folders, max_batch=1, max_loaded=2)
    limited = _run(engine, jobs)
    assert len(engine.adapters.slots) <= 2
    assert engine.adapters.loads == 4  # y, z, then x and y again (x was loaded first)
    assert limited == _run(_engine(tiny_model_dir, folders, max_batch=1), jobs)


def test_seeded_sampling_repeats_and_tiny_top_p_is_greedy(tiny_model_dir, folders):
    tok = load_tokenizer(str(tiny_model_dir))
    ids = tok("Once upon")["input_ids"]
    seeded = [(ids, "y", Sampling(max_tokens=8, temperature=1.5, seed=11, ignore_eos=True))]
    a = _run(_engine(tiny_model_dir, folders, 4), seeded * 3)
    assert a[0] == a[1] == a[2]
    greedy = _run(_engine(tiny_model_dir, folders, 4),
                  [(ids, "y", Sampling(max_tokens=8, temperature=0, ignore_eos=True)),
                   (ids, "y", Sampling(max_tokens=8, temperature=1.0, top_p=1e-6, seed=1,
                                       ignore_eos=True))])
    assert greedy[0] == greedy[1]


@pytest.mark.parametrize(("text", "stops", "end"), [
    ("hello wor", ("world",), 6),  # "wor" may become "world": held back
    ("hello", ("world",), 5),
    ("abc\ufffd", (), 3),  # half a character
    ("say ###", ("### Instruction:",), 4),
    ("", ("x",), 0),
])
def test_text_held_back_for_stops(text, stops, end):
    assert _safe_end(text, stops) == end


def test_first_stop():
    assert _first_stop("a STOP b END", ("END", "STOP")) == 2
    assert _first_stop("nothing", ("x",)) is None


def test_a_broken_adapter_fails_its_own_requests_only(tiny_model_dir, folders, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    tok = load_tokenizer(str(tiny_model_dir))
    engine = _engine(tiny_model_dir, {**folders, "broken": broken}, max_batch=4)
    answers = [Answer() for _ in range(3)]
    ids = tok("hi")["input_ids"]
    for answer, model in zip(answers, ["y", "broken", "base"], strict=True):
        engine.submit(Job(ids, model, Sampling(max_tokens=3, temperature=0), answer))
    engine.start()
    assert all(a.done.wait(60) for a in answers)
    engine.stop()
    assert answers[1].end.kind == "error" and "broken" in answers[1].end.text
    assert [a.end.kind for a in (answers[0], answers[2])] == ["finish", "finish"]


# -- run(): the engine on the calling thread (evaluation's generation) ----------------------


def test_run_lets_the_next_prompt_join_when_a_row_ends(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_base_model(str(tiny_model_dir), dtype="fp32").eval()
    log: list[tuple[str, int]] = []

    def job(i, max_tokens):
        def emit(event):
            log.append((event.kind, i))
        ids = tok(["a", "Once upon a time", "the sea", "b"][i])["input_ids"]
        return Job(ids, "", Sampling(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                   emit)

    engine = Engine(model, tok, max_batch=2)
    # Execute: two rows at a time; job 0 ends after 1 token, jobs 1-3 run 6 tokens each
    engine.run([job(0, 1), job(1, 6), job(2, 6), job(3, 6)])
    # Assert: job 2 joined while job 1 was still decoding (fixed batches of 2 would wait)
    first = {i: log.index(next(e for e in log if e[1] == i)) for i in range(4)}
    finish = {i: log.index(("finish", i)) for i in range(4)}
    assert first[2] < finish[1] and first[3] < finish[2]
    assert engine.max_rows_seen == 2
    # 6 tokens = a prefill + 5 steps each: rows overlap, so fewer steps than 5 per job
    assert engine.steps < 5 * 3


def test_run_keeps_within_the_token_budget(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_base_model(str(tiny_model_dir), dtype="fp32").eval()
    ids = tok("Once upon a time")["input_ids"]
    widths: list[int] = []
    engine = Engine(model, tok, max_batch=8)
    forward = engine._forward

    def spy(ids_, mask, positions, cache, rows, **kw):
        widths.append(len(rows) * (mask.shape[1] + 4))
        return forward(ids_, mask, positions, cache, rows, **kw)

    engine._forward = spy
    jobs = [Job(ids, "", Sampling(max_tokens=4, temperature=0, ignore_eos=True),
                lambda e: None) for _ in range(6)]
    # Execute: room for 2 rows of (prompt + 4 answer positions) at a time
    budget = 2 * (len(ids) + 4)
    engine.run(jobs, max_batch_tokens=budget)
    # Assert
    assert engine.max_rows_seen == 2
    assert max(widths) <= budget + 2 * 4  # the cache grows by the answer as it decodes


def test_echo_scores_prompts_in_groups_as_the_model_does_alone(tiny_model_dir, folders):
    # Prepare: prompts for three adapters and the base; room for ~2 rows' logits a prefill
    engine = _engine(tiny_model_dir, folders, max_batch=8)
    tok = engine.tokenizer
    texts = ["Once upon a time", "Write a poem about the sea and the sky", "a b", "The river"]
    prompts = [tok(t)["input_ids"] for t in texts]
    models = ["x", "y", "base", "z"]
    answers = [Answer() for _ in prompts]
    jobs = [Job(ids, m, Sampling(max_tokens=k, temperature=0), a, logprobs=3, echo=True)
            for ids, m, a, k in zip(prompts, models, answers, [0, 2, 1, 0], strict=True)]
    engine.echo_logits = 2 * max(map(len, prompts)) * engine.vocab
    prefills: list[int] = []
    group = engine._prefill_group
    engine._prefill_group = lambda js: (prefills.append(len(js)), group(js))[1]
    # Execute
    engine.run(jobs)
    # Assert: the prompts went in groups of at most 2 rows; each score is the model's own
    assert sum(prefills) == 4 and max(prefills) == 2
    for ids, model, answer, job in zip(prompts, models, answers, jobs, strict=True):
        slot = None if model == "base" else engine.adapters.slot(model)
        want = _own_logps(engine.model, ids, slot)
        scores = answer.end.scores
        assert len(scores) == len(ids) + job.sampling.max_tokens
        assert scores[0].token == ids[0] and scores[0].logprob is None
        for j in range(1, len(ids)):
            assert scores[j].token == ids[j]
            assert scores[j].logprob == pytest.approx(float(want[j - 1, ids[j]]), abs=1e-5)
            assert [t for t, _ in scores[j].top[:3]] == want[j - 1].topk(3).indices.tolist()
        if job.sampling.max_tokens:  # greedy: the first new token is the most likely
            assert scores[len(ids)].token == int(want[-1].argmax())
            assert scores[len(ids)].logprob == pytest.approx(float(want[-1].max()), abs=1e-5)
        else:
            assert answer.end.completion_tokens == 0 and answer.text == ""



def _own_logps(lm, ids, slot):
    """log_softmax (float64) of one prompt alone, its adapter active (None: the base)."""
    before = lm.active_adapter
    with torch.no_grad():
        if slot is None:
            with lm.disable_adapter():
                logits = lm(torch.tensor([ids])).logits[0]
        else:
            lm.set_adapter(slot)
            logits = lm(torch.tensor([ids])).logits[0]
            lm.set_adapter(before)
    return torch.log_softmax(logits.double(), -1)
