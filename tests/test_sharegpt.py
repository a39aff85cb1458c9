"""ShareGPT as the community reads it: leading assistant and trailing user turns dropped
(counted), role aliases, and what is left malformed follows data.invalid_rows."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedit.cli import app
from fedit.config import DataConfig, config_from_dict
from fedit.data.federated import split_data, write_split
from fedit.data.invalid import RowCounts
from fedit.data.load import load_rows
from fedit.errors import DataError


def _t(who: str, text: str) -> dict[str, str]:
    return {"from": who, "value": text}


SYS, Q, A = _t("system", "Be brief."), _t("human", "Name a bird."), _t("gpt", "A robin.")
CANONICAL = [{"role": "user", "content": "Name a bird."},
             {"role": "assistant", "content": "A robin."}]


def _write(path, conversations):
    path.write_text("".join(json.dumps({"id": str(i), "conversations": c}) + "\n"
                            for i, c in enumerate(conversations)), encoding="utf-8")
    return path


def _skip() -> RowCounts:
    return RowCounts.from_config(DataConfig(invalid_rows="skip", max_invalid_fraction=1.0))


def test_leading_assistant_turns_are_dropped_and_counted(tmp_path):
    # Prepare: one opening gpt turn; two of them after a system turn; none
    path = _write(tmp_path / "s.jsonl", [
        [_t("gpt", "...and that is all."), Q, A],
        [SYS, _t("gpt", "part 2"), _t("gpt", "part 3"), Q, A],
        [Q, A],
    ])
    counts = RowCounts()  # the default policy: nothing here is invalid
    # Execute
    rows = load_rows(str(path), invalid=counts)
    # Assert: three dropped by hand count, the rest as if they never were
    assert [r["messages"] for r in rows] == [
        CANONICAL, [{"role": "system", "content": "Be brief."}, *CANONICAL], CANONICAL]
    assert counts.dropped_turns == {"leading_assistant_turns": 3}
    assert counts.invalid == 0 and counts.rows == 3


def test_a_trailing_unanswered_user_turn_is_dropped_and_counted(tmp_path):
    path = _write(tmp_path / "s.jsonl", [[Q, A, _t("human", "And a fish?")], [Q, A]])
    counts = RowCounts()
    rows = load_rows(str(path), invalid=counts)
    assert [r["messages"] for r in rows] == [CANONICAL, CANONICAL]
    assert (rows[0]["instruction"], rows[0]["response"]) == ("Name a bird.", "A robin.")
    assert counts.dropped_turns == {"trailing_user_turns": 1}


@pytest.mark.parametrize("user", ["human", "user"])
@pytest.mark.parametrize("assistant", ["gpt", "chatgpt", "bing", "bard", "assistant"])
def test_role_aliases(tmp_path, user, assistant):
    path = _write(tmp_path / "s.jsonl", [[_t(user, "Name a bird."), _t(assistant, "A robin.")]])
    assert load_rows(str(path))[0]["messages"] == CANONICAL


def test_turn_numbers_name_the_file_after_drops(tmp_path):
    # turn 1 (gpt) is dropped; turns 2 and 3 are two user turns: named as in the file
    path = _write(tmp_path / "s.jsonl", [[_t("gpt", "hi"), Q, Q, A]])
    with pytest.raises(DataError, match=r"s.jsonl:1: turn 3: two user turns in a row"):
        load_rows(str(path))


@pytest.mark.parametrize(
    ("conversation", "message", "reason"),
    [
        ([], r"s.jsonl:2: field 'conversations' must be a non-empty list of turns",
         "empty conversation"),
        ([_t("gpt", "only an answer")], r"s.jsonl:2: no assistant turn", "no exchange"),
        ([_t("human", "only a question")], r"s.jsonl:2: no assistant turn", "no exchange"),
        ([_t("gpt", "a"), _t("human", "q")], r"s.jsonl:2: no assistant turn", "no exchange"),
        ([SYS], r"s.jsonl:2: no assistant turn", "no exchange"),
        ([Q, _t("gpt", " ")], r"s.jsonl:2: turn 2 is an empty assistant turn", "empty answer"),
        ([Q, _t("bot", "x")], r"s.jsonl:2: turn 2 has role 'bot'", "unknown role"),
    ],
)
def test_what_is_left_malformed_follows_invalid_rows(tmp_path, conversation, message, reason):
    path = _write(tmp_path / "s.jsonl", [[Q, A], conversation, [Q, A]])
    # error (the default): stops, naming file, line and reason
    with pytest.raises(DataError, match=message):
        load_rows(str(path))
    # skip: dropped and counted under its reason; the dropped turns of it are not counted
    counts = _skip()
    assert len(load_rows(str(path), invalid=counts)) == 2
    assert counts.reasons == {reason: 1} and not counts.dropped_turns


def test_dropped_turns_in_stats_json_and_inspect(tmp_path):
    # Prepare: a party's export with 2 leading gpt turns, 1 trailing human turn, 1 empty row
    folder = tmp_path / "clients"
    folder.mkdir()
    export = [[_t("gpt", f"tail {i}"), _t("human", f"Question {i}?"), _t("gpt", f"Answer {i}.")]
              for i in range(2)]
    export += [[_t("human", f"Q{i}?"), _t("gpt", f"A{i}."), _t("human", "thanks")]
               for i in range(2, 3)]
    export += [[]] + [[_t("human", f"Q{i}?"), _t("gpt", f"A{i}.")] for i in range(3, 6)]
    _write(folder / "party.jsonl", export)
    cfg = config_from_dict({"seed": 1, "data": {"clients_dir": str(folder), "test_per_label": 0,
                                                "invalid_rows": "skip"}})
    # Execute
    data = split_data(cfg)
    write_split(data, tmp_path / "run")
    result = CliRunner().invoke(app, ["data", "inspect", str(folder / "party.jsonl"),
                                      "--model", "none", "--invalid-rows", "skip"])
    # Assert
    stats = json.loads((tmp_path / "run" / "partitions" / "stats.json").read_text())
    assert stats["invalid"]["party"] == {
        "rows": 7, "invalid": 1, "reasons": {"empty conversation": 1},
        "leading_assistant_turns": 2, "trailing_user_turns": 1}
    assert stats["invalid"]["total"] == stats["invalid"]["party"]
    assert result.exit_code == 0, result.output
    assert "turns dropped from conversations: 2 leading assistant, 1 trailing user" \
        in result.output
    assert "invalid rows (skipped): 1 of 7" in result.output
