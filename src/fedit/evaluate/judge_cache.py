"""The LLM judge's reply cache: one SQLite file, by default in fedit's cache folder.

Replies are keyed by a hash of the judge model and the full prompt (not the URL), so a
re-run, or the same answers judged from another folder, makes no request. Which replies are
worth keeping (only those with a verdict) is the caller's choice: see ``judge.Judge``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from fedit.evaluate.judge_client import JudgeError, one_line
from fedit.model.convert import cache_dir


def default_cache_path() -> Path:
    """Return ``<cache>/judge/replies.sqlite`` in fedit's cache folder.

    Returns
    -------
    Path
        Under :func:`fedit.model.convert.cache_dir` (``$FEDIT_CACHE``, default
        ``~/.cache/fedit``).
    """
    return cache_dir() / "judge" / "replies.sqlite"


def cache_key(model: str, messages: list[dict[str, str]]) -> str:
    """Return the key of a prompt: sha256 of the judge model and the full prompt.

    Parameters
    ----------
    model : str
        The judge model's name.
    messages : list of dict
        The chat messages sent to it.

    Returns
    -------
    str
        A hex digest; the URL is left out on purpose, so any spelling of the same
        endpoint (or another server of the same model) shares the replies.
    """
    blob = json.dumps({"model": model, "messages": messages, "temperature": 0},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Judge replies by :func:`cache_key`, in one SQLite file (safe across threads and runs).

    Parameters
    ----------
    path : Path
        The SQLite file, created with its folder when missing.

    Raises
    ------
    JudgeError
        The file cannot be opened or created.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, "
                             "model TEXT, reply TEXT, created REAL)")
        except (OSError, sqlite3.Error) as exc:
            raise JudgeError(f"{path}: cannot open the judge cache ({one_line(exc)}): point "
                             "--cache or FEDIT_CACHE at a writable place") from exc
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        """Return the reply stored under ``key``, None when there is none."""
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, reply: str) -> None:
        """Store ``reply`` of ``model`` under ``key``, replacing any earlier one."""
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                             (key, model, reply, time.time()))

    def close(self) -> None:
        """Close the database."""
        self._db.close()
