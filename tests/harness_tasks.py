"""Small local lm-evaluation-harness tasks written by a test (no hub, no network).

``write_mc_task(folder, rows, name)`` writes a multiple-choice task (its YAML and its JSONL
data) that ``lm_eval.tasks.TaskManager(include_path=folder)`` finds by ``name``; used by
the serving tests (``local-completions`` against ``fedit serve``) and by ``fedit eval
--task-file``'s tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def write_mc_task(folder: Path, rows: list[dict[str, Any]], name: str) -> Path:
    """A multiple-choice task over ``rows``; returns its YAML's path.

    Parameters
    ----------
    folder : Path
        Where the YAML and ``<name>.jsonl`` go (made if missing): the TaskManager's
        ``include_path``.
    rows : list of dict
        ``{"question": str, "choices": [str, ...], "answer": int}`` (the right choice's index).
    name : str
        The task's name, as ``tasks=[name]`` asks for it.

    The prompt is ``Question: {question}\\nAnswer:``; each choice follows it after a space;
    the metrics are ``acc`` and ``acc_norm``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        if set(row) != {"question", "choices", "answer"} or not \
                0 <= row["answer"] < len(row["choices"]):
            raise ValueError(f"rows[{i}]: want question, choices and an answer index into "
                             f"choices, got {row}")
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean",
                         "higher_is_better": True}],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return path
