"""Conversation rows: loading (OpenAI and ShareGPT shapes), validation, the assistant-only
label mask for two chat templates, whole-turn truncation, prompts for evaluation."""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from fedit.cli import app
from fedit.data.batching import tokenize_for_run
from fedit.data.conversations import render
from fedit.data.inspect import format_inspect, inspect_rows
from fedit.data.load import load_rows
from fedit.data.prompts import IGNORE_INDEX, build_prompt, tokenize_row
from fedit.errors import DataError
from fedit.model.base import LoraSpec, attach_lora, load_base_model
from fedit.model.generate import generate_answers
from tests.conftest import make_rows, write_config, write_jsonl

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "Name a bird."},
    {"role": "assistant", "content": "A robin."},
    {"role": "user", "content": "And a fish?"},
    {"role": "assistant", "content": "A trout."},
]
# Zephyr's shape, unlike ChatML: <|role|> headers and </s> after every turn
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ENDS = {"chatml": "<|im_end|>\n", "zephyr": "</s>\n"}


@pytest.fixture
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _write(tmp_path, rows, name="chats.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _label_runs(ids, labels):
    """Decoded runs of consecutive labelled tokens; every label equals its token."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        assert label in (IGNORE_INDEX, token)
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return runs


@pytest.mark.parametrize("template", ["chatml", "zephyr"])
def test_labels_on_every_assistant_turn_only(tok, template):
    # Prepare: the built-in ChatML text, or the model's own (Zephyr-like) chat template
    if template == "zephyr":
        tok.chat_template = ZEPHYR
    row = {"messages": [SYSTEM, *TURNS]}
    # Execute
    ex = tokenize_row(tok, row, template="chatml" if template == "chatml" else "alpaca",
                      cutoff_len=512)
    # Assert: the labelled tokens are exactly the two answers with their end markers, and
    # every other token (system, user turns, headers) carries none
    runs = _label_runs(ex.input_ids, ex.labels)
    assert [tok.decode(r) for r in runs] == [f"A robin.{ENDS[template]}",
                                             f"A trout.{ENDS[template]}"]
    unlabelled = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True)
                  if lab == IGNORE_INDEX]
    assert "robin" not in tok.decode(unlabelled) and "trout" not in tok.decode(unlabelled)
    assert "Be brief." in tok.decode(unlabelled) and "And a fish?" in tok.decode(unlabelled)
    assert not ex.truncated


def test_whole_turns_are_dropped_from_the_end(tok):
    row = {"messages": TURNS}
    full = tokenize_row(tok, row, template="chatml", cutoff_len=512)
    first_end = len(tok("<|im_start|>user\nName a bird.<|im_end|>\n<|im_start|>assistant\n"
                        "A robin.<|im_end|>\n").input_ids)
    # Execute: room for the first answer and part of the second
    cut = tokenize_row(tok, row, template="chatml", cutoff_len=len(full.input_ids) - 2)
    # Assert: the second exchange is gone whole, the first answer is intact
    assert cut.truncated and len(cut.input_ids) == first_end
    assert cut.input_ids == full.input_ids[:first_end]
    assert [tok.decode(r) for r in _label_runs(cut.input_ids, cut.labels)] == [
        "A robin.<|im_end|>\n"]


def test_truncated_and_skipped_conversations_are_counted(tok, tmp_path):
    short, long = {"messages": TURNS[:2]}, {"messages": TURNS}
    # both first turns too long: shortening the longer one alone cannot make room
    too_long = {"messages": [{"role": "system", "content": "word " * 80},
                             {"role": "user", "content": "word " * 80}, TURNS[1]]}
    data = SimpleNamespace(template="chatml", cutoff_len=40, train_on_inputs=False,
                           truncation="context", min_response_tokens=16)
    stats = tmp_path / "data_stats.json"
    logs: list[str] = []
    # Execute
    examples, kept = tokenize_for_run(tok, [short, long, too_long], data, "c", logs.append,
                                      stats)
    # Assert: the long one lost its second exchange, the one whose first answer cannot fit
    # is skipped, and both are counted
    assert kept == [0, 1] and [e.truncated for e in examples] == [False, True]
    assert json.loads(stats.read_text())["length"]["c"] == {"rows": 3, "truncated": 1, "skipped": 1}
    assert len(logs) == 2


def test_openai_and_sharegpt_rows_load_the_same(tmp_path):
    sharegpt = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."}]
    openai = [{"role": r, "content": c} for r, c in
              [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")]]
    path = _write(tmp_path, [{"conversations": sharegpt, "category": "chat"},
                             {"messages": openai, "category": "chat"}])
    # Execute
    rows = load_rows(str(path))
    # Assert: one canonical shape; the last exchange also as instruction / response
    for row in rows:
        assert row["messages"] == openai and row["category"] == "chat"
        assert (row["instruction"], row["context"], row["response"]) == ("Hi", "", "Hello.")
        assert "conversations" not in row


def test_a_mapped_conversation_column(tmp_path):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    path = _write(tmp_path, [{"dialog": turns, "messages": "not this one"}])
    rows = load_rows(str(path), {"messages": "dialog"})
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "Hello."}
    with pytest.raises(DataError, match=r"chats.jsonl:1: field 'talk' is missing"):
        load_rows(str(path), {"messages": "talk"})


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"content": "Hi"}, TURNS[1]], r"chats.jsonl:2: turn 1 has no role"),
        ([TURNS[0], {"role": "assistant", "content": "  "}],
         r"chats.jsonl:2: turn 2 is an empty assistant turn"),
        ([TURNS[0], TURNS[2], TURNS[1]], r"chats.jsonl:2: turn 2: two user turns in a row"),
        ([SYSTEM, TURNS[0], SYSTEM, TURNS[1]], r"chats.jsonl:2: turn 3: a system turn after"),
        ([SYSTEM, TURNS[0]], r"chats.jsonl:2: no assistant turn"),
        ([TURNS[1], TURNS[0], TURNS[0], TURNS[1]],
         r"chats.jsonl:2: turn 3: two user turns in a row"),
        ([{"from": "bot", "value": "x"}], r"chats.jsonl:2: turn 1 has role 'bot'"),
        ([], r"chats.jsonl:2: field 'messages' must be a non-empty list"),
    ],
)
def test_bad_conversations_name_file_line_and_reason(tmp_path, turns, message):
    path = _write(tmp_path, [{"messages": TURNS}, {"messages": turns}])
    with pytest.raises(DataError, match=message):
        load_rows(str(path))


def test_a_model_without_chat_template_needs_chatml(tok):
    tok.chat_template = None
    row = {"messages": TURNS}
    with pytest.raises(DataError, match='no chat template.*data.template = "chatml"'):
        tokenize_row(tok, row, template="alpaca")
    assert tokenize_row(tok, row, template="chatml").num_labels > 0


def test_a_template_that_is_not_prefix_stable_is_refused(tok):
    # the last turn is rendered differently from the same turn followed by others
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(DataError, match="does not render turn 2 .* as a prefix"):
        tokenize_row(tok, {"messages": TURNS}, template="chat")


def test_eval_prompt_is_the_conversation_up_to_the_last_answer(tmp_path):
    path = _write(tmp_path, [{"messages": TURNS}])
    (row,) = load_rows(str(path))
    prompt = build_prompt(row, "chatml")
    assert prompt == ("<|im_start|>user\nName a bird.<|im_end|>\n<|im_start|>assistant\n"
                      "A robin.<|im_end|>\n<|im_start|>user\nAnd a fish?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert row["response"] == "A trout."  # what the answer is scored against


def test_chatml_for_instruction_rows():
    row = {"instruction": "Name a bird.", "context": "", "response": "A robin."}
    assert build_prompt(row, "chatml") == (
        "<|im_start|>user\nName a bird.<|im_end|>\n<|im_start|>assistant\n")


def test_answers_to_conversations_are_generated(tiny_model_dir, tok):
    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="fp32"), LoraSpec(), 0)
    rows = [{"messages": TURNS}, {"messages": TURNS[:2]}]
    out = generate_answers(model, tok, rows, template="chatml", max_new_tokens=6)
    assert len(out.answers) == 2
    assert not any(re.search(r"<\|im_(start|end)\|>", a) for a in out.answers)


def test_inspect_reports_turns_and_tokens_per_role(tok):
    rows = [{"messages": [SYSTEM, *TURNS], "category": "a"},
            {"messages": TURNS[:2], "category": "b"}]
    # Execute
    report = inspect_rows(rows, tokenizer=tok, template="chatml")
    # Assert: 5 and 2 turns; assistant turns "A robin." x2 and "A trout."
    conv = report["conversations"]
    assert conv["rows"] == 2 and conv["turns"]["max"] == 5 and conv["turns"]["p50"] == 2
    assert conv["turns_by_role"] == {"assistant": 3, "system": 1, "user": 3}
    n = {c: len(tok(c, add_special_tokens=False).input_ids) for c in ("A robin.", "A trout.")}
    assert conv["tokens_by_role"]["assistant"]["max"] == max(n.values())
    whole = len(tok(render(tok, rows[0]["messages"], "chatml", False)).input_ids)
    assert report["tokens"]["max"] == whole  # the whole conversation, no EOS added
    text = format_inspect(report)
    assert "conversations: 2 rows; turns: assistant 3, system 1, user 3" in text
    assert any(line.split()[:3] == ["assistant", "turn", "(tokens)"]
               for line in text.splitlines())
    # without a tokenizer: characters only, rendered as ChatML
    assert inspect_rows(rows)["conversations"]["tokens_by_role"] is None


def _chat_rows(n):
    """Two-exchange conversations in ShareGPT's shape, half of them with a system turn."""
    rows = []
    for i, row in enumerate(make_rows(n, seed=5)):
        turns = [{"from": "human", "value": row["instruction"]},
                 {"from": "gpt", "value": row["response"]},
                 {"from": "human", "value": "Again?"},
                 {"from": "gpt", "value": row["response"]}]
        system = [{"from": "system", "value": "Be brief."}] if i % 2 else []
        rows.append({"conversations": system + turns, "category": row["category"]})
    return rows


def test_train_and_eval_on_conversations(tmp_path, tiny_model_dir):
    # Prepare: a ShareGPT file, the built-in ChatML template
    data = write_jsonl(tmp_path / "chats.jsonl", _chat_rows(48))
    cfg = write_config(tmp_path / "chat.toml", tiny_model_dir, data, name="chat",
                       data={"test_per_label": 2, "cutoff_len": 256, "template": "chatml"},
                       train={"max_steps": 2})
    # Execute: train, then evaluate the run
    trained = CliRunner().invoke(app, ["train", str(cfg)])
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "chat"
    evaluated = CliRunner().invoke(app, ["eval", str(run), "--set", "eval.max_new_tokens=4",
                                         "--set", "eval.similarity=false"])
    assert evaluated.exit_code == 0, evaluated.output
    # Assert: the held-out conversations kept their turns; each answer is scored against
    # the conversation's last assistant turn; counts are recorded
    test_rows = [json.loads(x) for x in (run / "test.jsonl").read_text().splitlines()]
    assert all(len(r["messages"]) in (4, 5) for r in test_rows)
    answers = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
    assert [a["reference"] for a in answers] == [r["messages"][-1]["content"]
                                                for r in test_rows]
    assert all(a["instruction"] == "Again?" and a["loss"] is not None for a in answers)
    stats = json.loads((run / "partitions" / "stats.json").read_text())["length"]
    assert stats["held-out set"]["rows"] == len(test_rows)  # clients' rows + held-out rows
    assert stats["total"]["skipped"] == 0 and stats["total"]["rows"] == 48


@pytest.mark.parametrize("held_out", [1, 0])
def test_train_refuses_a_model_without_chat_template(tmp_path, tiny_model_dir, held_out):
    # Prepare: the tiny model, its tokenizer without a chat template
    model_dir = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = None
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(model_dir)
    assert not AutoTokenizer.from_pretrained(model_dir).chat_template
    data = write_jsonl(tmp_path / "chats.jsonl", _chat_rows(24))
    cfg = write_config(tmp_path / "chat.toml", model_dir, data, name="chat",
                       data={"test_per_label": held_out}, train={"max_steps": 1})
    # Execute
    result = CliRunner().invoke(app, ["train", str(cfg)])
    # Assert: one clear line, before any round
    assert result.exit_code != 0
    assert 'no chat template' in result.output and 'data.template = "chatml"' in result.output
