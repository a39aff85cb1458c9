"""`fedit data self-play`: preference pairs built offline from instruction rows (the human
reference chosen, the model's own greedy answer rejected), selected, checked and cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fedit.model.self_play as sp
from fedit.cli import app
from fedit.config import config_from_dict
from fedit.data.load import load_rows
from fedit.data.preference_tokens import tokenize_pair
from fedit.data.preferences import is_preference
from fedit.data.prompts import build_prompt
from fedit.errors import ConfigError, DataError
from fedit.model.base import load_base_model, load_tokenizer
from fedit.model.generate import generate_answers
from tests.conftest import make_rows, write_jsonl


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def rows_file(tmp_path) -> Path:
    rows = make_rows(40)
    rows[1]["response"] = " ".join(["word"] * 60)  # too long a reference for 40 new tokens
    rows[2]["instruction"] = "Tell me " + "a lot " * 40  # too long a prompt for 48 tokens
    rows[3] = {**rows[0], "response": "another answer"}  # the same prompt as row 0
    return write_jsonl(tmp_path / "rows.jsonl", rows)


def _settings(rows_file: Path, model: Path, **kw) -> sp.SelfPlaySettings:
    base = {"source": str(rows_file), "model": str(model), "per_label": 3,
            "max_prompt_tokens": 48, "max_new_tokens": 40, "batch_size": 4}
    return sp.SelfPlaySettings(**{**base, **kw})


def test_selection_filters_dedups_and_draws_per_label(rows_file, talking_model_dir):
    tok = load_tokenizer(str(talking_model_dir))
    rows = load_rows(str(rows_file))
    s = _settings(rows_file, talking_model_dir)
    picked, counts = sp.select_rows(rows, tok, s)
    assert counts == {"rows": 40, "no_label": 0, "prompt_too_long": 1,
                      "response_too_long_or_empty": 1, "duplicate_prompt": 1}
    labels = sorted({r["category"] for r in rows})
    assert [r["category"] for r in picked] == [c for c in labels for _ in range(3)]
    ids = {id(r) for r in picked}
    assert id(rows[1]) not in ids and id(rows[2]) not in ids and id(rows[3]) not in ids
    for r in picked:  # what was kept fits the settings, counted independently
        assert len(tok(sp.pair_prompt(r), add_special_tokens=False)["input_ids"]) <= 48
        assert 1 <= len(tok(r["response"], add_special_tokens=False)["input_ids"]) <= 40
    again, _ = sp.select_rows(rows, tok, s)
    assert [r["instruction"] for r in again] == [r["instruction"] for r in picked]  # seeded
    other, _ = sp.select_rows(rows, tok, _settings(rows_file, talking_model_dir, seed=7))
    assert [r["instruction"] for r in other] != [r["instruction"] for r in picked]


def test_pairs_are_the_reference_against_the_models_greedy_answer(cache, rows_file,
                                                                  talking_model_dir):
    s = _settings(rows_file, talking_model_dir)
    built = sp.build_self_play(s, log=lambda m: None)
    assert not built.cached and built.path.parent == cache / "preferences"
    pairs = [json.loads(x) for x in built.path.read_text(encoding="utf-8").splitlines()]
    # the same answers computed here, independently of the builder
    tok = load_tokenizer(str(talking_model_dir))
    picked, _ = sp.select_rows(load_rows(str(rows_file)), tok, s)
    model = load_base_model(str(talking_model_dir), dtype="fp32")
    gen = generate_answers(model, tok, [{"instruction": sp.pair_prompt(r), "context": ""}
                                        for r in picked], template="chatml", max_new_tokens=40)
    expected = [(r, a, n) for r, a, n in zip(picked, gen.answers, gen.tokens, strict=True)
                if a.strip()]
    assert len(pairs) == len(expected) == built.manifest["pairs"]
    for pair, (row, answer, n) in zip(pairs, expected, strict=True):
        assert pair["chosen"] == row["response"] and pair["rejected"] == answer
        assert pair["category"] == row["category"]
        assert pair["rejected_tokens"] == n and pair["rejected_cut"] == (n >= 40)
    m = built.manifest
    assert m["dropped"]["empty_answer"] == len(picked) - len(expected)
    assert m["rejected_cut"] == sum(p["rejected_cut"] for p in pairs)
    assert sum(m["per_label"].values()) == len(pairs)
    assert "2401.01335" in m["construction"]
    # the file is preference data a run reads, and its prompt renders as generation's did
    loaded = load_rows(str(built.path))
    assert all(is_preference(r) for r in loaded)
    ex = tokenize_pair(tok, loaded[0], template="chatml", cutoff_len=256)
    text = build_prompt({"instruction": sp.pair_prompt(picked[0]), "context": ""}, "chatml", tok)
    assert tok.decode(ex.prompt_ids) == text


def test_built_once_then_read_from_the_cache(cache, rows_file, talking_model_dir, monkeypatch,
                                             tmp_path):
    s = _settings(rows_file, talking_model_dir)
    first = sp.build_self_play(s, log=lambda m: None)
    calls = []
    monkeypatch.setattr(sp, "generate_answers", lambda *a, **k: calls.append(1))
    out = tmp_path / "copy.jsonl"
    again = sp.build_self_play(_settings(rows_file, talking_model_dir, batch_size=2), out=out,
                               log=lambda m: None)
    assert again.cached and again.path == first.path and calls == []
    assert out.read_bytes() == first.path.read_bytes()
    # other settings, or another source file, are another entry
    assert _settings(rows_file, talking_model_dir, max_new_tokens=30).key() != s.key()
    before = s.key()
    rows_file.write_text(rows_file.read_text() + json.dumps(make_rows(41)[-1]) + "\n")
    assert _settings(rows_file, talking_model_dir).key() != before


def test_an_answer_equal_to_its_reference_is_dropped(cache, rows_file, talking_model_dir,
                                                     monkeypatch):
    s = _settings(rows_file, talking_model_dir)
    tok = load_tokenizer(str(talking_model_dir))
    picked, _ = sp.select_rows(load_rows(str(rows_file)), tok, s)
    real = sp.generate_answers

    def echo_first(model, tokenizer, rows, **kw):  # the first answer repeats its reference
        gen = real(model, tokenizer, rows, **kw)
        gen.answers[0] = "  " + picked[0]["response"].upper()
        return gen

    monkeypatch.setattr(sp, "generate_answers", echo_first)
    built = sp.build_self_play(s, log=lambda m: None)
    assert built.manifest["dropped"]["same_as_reference"] == 1
    assert picked[0]["response"] not in [json.loads(x)["chosen"] for x in
                                         built.path.read_text().splitlines()]


def test_cli_builds_and_reports(cache, rows_file, talking_model_dir, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = ["data", "self-play", str(rows_file), "--model", str(talking_model_dir), "--out",
            str(out), "--per-label", "2", "--max-new-tokens", "40", "--max-prompt-tokens", "48"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    n = len(out.read_text().splitlines())
    assert f"{n} pairs (" in result.output and f"copy: {out}" in result.output
    assert "self-play pairs:" in result.output  # the log line (stderr)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "cached" in again.output


def test_bad_settings_and_no_qualifying_rows_are_one_line(cache, rows_file, talking_model_dir):
    with pytest.raises(ConfigError, match="--per-label 0: must be an integer >= 1"):
        _settings(rows_file, talking_model_dir, per_label=0)
    with pytest.raises(ConfigError, match="--template 'x'"):
        _settings(rows_file, talking_model_dir, template="x")
    with pytest.raises(DataError, match="no row has a prompt of <= 2 tokens"):
        sp.build_self_play(_settings(rows_file, talking_model_dir, max_prompt_tokens=2),
                           log=lambda m: None)
    result = CliRunner().invoke(app, ["data", "self-play", str(rows_file), "--model",
                                      str(talking_model_dir), "--max-prompt-tokens", "2"])
    assert result.exit_code != 0
    assert "no row has a prompt" in result.output and "Traceback" not in result.output


def test_config_check_is_unchanged_by_the_module():
    # the pairs are ordinary preference rows: a DPO run config reads them with no new keys
    cfg = config_from_dict({"data": {"path": "x.jsonl", "template": "chatml"},
                            "train": {"objective": "dpo"}})
    assert cfg.train.objective == "dpo"
