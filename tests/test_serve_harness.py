"""``/v1/completions`` as vLLM answers it: prompt batches, ``echo`` and ``logprobs``, so that
lm-evaluation-harness's ``local-completions`` scores a served adapter over HTTP; its
log-likelihoods equal the harness's own ``hf`` model on the same base + adapter."""

from __future__ import annotations

import httpx
import pytest
import torch

from fedit.serve.launch import ServerProcess as Served
from tests.conftest import KEY
from tests.harness_tasks import write_mc_task

ROWS = [
    {"question": "Which one is near the river?", "choices": ["the stone", "the bird",
                                                             "the garden"], "answer": 0},
    {"question": "What colour is the summer sky?", "choices": ["blue", "dark green"],
     "answer": 0},
    {"question": "Where does the north wind go?", "choices": ["south", "east", "west city",
                                                              "ocean"], "answer": 2},
    {"question": "Tell me about the apple.", "choices": ["small and red", "large"],
     "answer": 1},
]


@pytest.fixture(scope="module")
def scorer(loud):
    """``loud`` served in fp32 behind a key (the harness sends it as OPENAI_API_KEY)."""
    served = Served([str(loud), "--dtype", "fp32", "--api-key-env", "FEDIT_TEST_KEY"],
                    env={"FEDIT_TEST_KEY": KEY})
    yield served
    served.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, loud):
    """Each token's log-prob (float64 log_softmax) under base + ``loud``, loaded by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(loud)).eval()

    def logps(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)

    return tok, logps


def _post(server, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)


def test_echo_logprobs_of_a_batch_equal_the_models_own(scorer, reference):
    tok, logps = reference
    prompts = ["Tell me about the river and the mountain.", "The bird is near"]
    r = _post(scorer, {"model": "loud", "prompt": prompts, "echo": True, "logprobs": 2,
                       "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    total = 0
    for prompt, choice in zip(prompts, body["choices"], strict=True):
        ids = tok(prompt)["input_ids"]
        want = logps(ids)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1  # the prompt's tokens, then the new one
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for j in range(1, len(ids)):  # token j given tokens 0..j-1
            assert lp["token_logprobs"][j] == pytest.approx(float(want[j - 1, ids[j]]),
                                                            abs=1e-5)
            top = lp["top_logprobs"][j]  # the 2 most likely and the prompt's own token
            shown = [*want[j - 1].topk(2).indices.tolist(), ids[j]]
            assert set(top) == {tok.decode([t]) for t in shown}
            for text, value in top.items():  # ids of one text: the most likely one's
                assert value == pytest.approx(max(float(want[j - 1, t]) for t in shown
                                                  if tok.decode([t]) == text), abs=1e-5)
            assert max(top.values()) == pytest.approx(float(want[j - 1].max()), abs=1e-5)
        greedy = int(want[-1].argmax())  # temperature 0: the most likely next token
        assert lp["tokens"][-1] == tok.decode([greedy])
        assert lp["token_logprobs"][-1] == pytest.approx(float(want[-1, greedy]), abs=1e-5)
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
        assert choice["text"] == prompt + tok.decode([greedy], skip_special_tokens=True)
        assert lp["tokens"][:-1] == [tok.decode([i]) for i in ids]
        offsets = [sum(len(t) for t in lp["tokens"][:j]) for j in range(len(ids) + 1)]
        assert lp["text_offset"] == offsets
        total += len(ids)
    assert body["usage"]["prompt_tokens"] == total
    assert body["usage"]["completion_tokens"] == 2


def test_token_id_prompts_with_max_tokens_0_score_the_prompt_only(scorer, reference):
    tok, logps = reference
    batch = [tok("The river")["input_ids"], tok("Tell me about the apple.")["input_ids"]]
    r = _post(scorer, {"model": "loud", "prompt": batch, "echo": True, "logprobs": 0,
                       "max_tokens": 0})
    assert r.status_code == 200, r.text
    for ids, choice in zip(batch, r.json()["choices"], strict=True):
        lp = choice["logprobs"]
        assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
        want = logps(ids)
        assert lp["token_logprobs"][1:] == pytest.approx(
            [float(want[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-5)
        assert [list(t) for t in lp["top_logprobs"][1:]] == [[s] for s in lp["tokens"][1:]]
    assert r.json()["usage"]["completion_tokens"] == 0
    # without echo: the new tokens' log-probs only, a choice per prompt
    r = _post(scorer, {"model": "loud", "prompt": ["The river", "The bird"], "logprobs": 1,
                       "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    for choice in r.json()["choices"]:
        assert len(choice["logprobs"]["tokens"]) == 3
        assert "".join(choice["logprobs"]["tokens"]) == choice["text"]


@pytest.mark.parametrize(("body", "message"), [
    ({"prompt": []}, "prompt: an empty list; give at least one prompt"),
    ({"prompt": ["a", ""]}, "prompt[1]: empty; give at least one token"),
    ({"prompt": [[1, 2], [99999]]}, "prompt[1]: token id 99999 is outside the vocabulary"),
    ({"prompt": "a", "logprobs": 21}, "logprobs: Input should be less than or equal to 20"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens: 0 only with echo"),
    ({"prompt": "a", "echo": True, "stream": True}, "stream: not supported with echo"),
    ({"prompt": ["a", "b"], "n": 2}, "only n=1 is supported"),
])
def test_bad_completion_requests_are_400s_in_one_line(scorer, body, message):
    r = _post(scorer, {"model": "loud", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"


def _samples(results, task):
    return {s["doc_id"]: [float(x[0][0]) for x in s["resps"]]  # [[(logprob, greedy)]]
            for s in results["samples"][task]}


@pytest.fixture(scope="module")
def hf_samples(tiny_model_dir, loud, tmp_path_factory):
    """The harness's own ``hf`` model on base + ``loud`` (fp32): per-doc log-likelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    write_mc_task(folder, ROWS, "fedit_mc")
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_model_dir},peft={loud},dtype=float32",
        tasks=["fedit_mc"], task_manager=TaskManager(include_path=str(folder)),
        log_samples=True, device="cpu")
    return folder, _samples(results, "fedit_mc"), results["results"]["fedit_mc"]


@pytest.fixture(scope="module")
def fedit_samples(hf_samples, loud, tmp_path_factory):
    """``fedit eval <loud> --task-file`` on the same task: per-doc log-likelihoods."""
    import json

    from typer.testing import CliRunner

    from fedit.cli import app

    folder, _, _ = hf_samples
    out = tmp_path_factory.mktemp("fedit-eval")
    result = CliRunner().invoke(app, ["eval", str(loud), "--task-file",
                                      str(folder / "fedit_mc.yaml"), "--no-heldout",
                                      "--out", str(out), "--set", "model.dtype=fp32"])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (out / "tasks.jsonl").read_text().splitlines()]
    return {r["doc_id"]: r for r in records}


@pytest.mark.slow  # ~25 s each, and ~30 s for the hf reference once
@pytest.mark.parametrize(("tokenized", "batch"), [(True, 2), (False, 1)])
def test_lm_eval_local_completions_equals_its_hf_model(scorer, hf_samples, fedit_samples,
                                                      tiny_model_dir, tokenized, batch,
                                                      monkeypatch):
    """The harness's ``local-completions`` against ``fedit serve`` equals its own ``hf``
    model and ``fedit eval --task-file`` on the same adapter, document by document."""
    import importlib.util

    import lm_eval
    from lm_eval.tasks import TaskManager

    if importlib.util.find_spec("tenacity") is None:  # lm-eval's API models need its [api]
        pytest.fail("lm-eval's API models need tenacity: pip install 'lm-eval[api]'",
                    pytrace=False)

    folder, want, want_metrics = hf_samples
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    args = (f"base_url={scorer.url}/v1/completions,model=loud,tokenizer={tiny_model_dir},"
            f"tokenizer_backend=huggingface,tokenized_requests={tokenized},"
            f"batch_size={batch},num_concurrent=1,max_retries=1")
    results = lm_eval.simple_evaluate(
        model="local-completions", model_args=args, tasks=["fedit_mc"],
        task_manager=TaskManager(include_path=str(folder)), log_samples=True)
    got = _samples(results, "fedit_mc")
    assert sorted(got) == list(range(len(ROWS)))
    for doc in want:
        assert len(got[doc]) == len(ROWS[doc]["choices"])
        assert got[doc] == pytest.approx(want[doc], abs=1e-4), doc
        assert got[doc] == pytest.approx(fedit_samples[doc]["loglikelihoods"], abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"]["fedit_mc"][metric] == want_metrics[metric]
    per_doc = {s["doc_id"]: s for s in results["samples"]["fedit_mc"]}
    for doc, record in fedit_samples.items():
        assert record["metrics"]["acc"] == per_doc[doc]["acc"]
