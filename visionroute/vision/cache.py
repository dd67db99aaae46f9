"""A persistent cache of Vision API answers, so that re-running a finished job makes no new billable calls.

Keyed by (provider, feature, image sha256, API version): the same bytes asked the same question of the same API
version get the stored answer. Only answers are stored, never errors (a failure may not fail next time).
One SQLite file in the state folder; safe across threads and processes (WAL, one connection per thread).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from visionroute.vision.base import Annotation


class ResultCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connection() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS answers (provider TEXT, feature TEXT, sha256 TEXT, "
                "api_version TEXT, answer TEXT NOT NULL, stored_at REAL NOT NULL, "
                "PRIMARY KEY (provider, feature, sha256, api_version))"
            )

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=30)
        return db

    def get_many(
        self, provider: str, feature: str, api_version: str, digests: list[str]
    ) -> dict[str, Annotation]:
        """The cached answers among `digests`, by sha256."""
        found: dict[str, Annotation] = {}
        db = self._connection()
        for start in range(0, len(digests), 500):  # SQLite caps the number of bound parameters
            chunk = digests[start : start + 500]
            rows = db.execute(
                f"SELECT sha256, answer FROM answers WHERE provider=? AND feature=? AND api_version=? "
                f"AND sha256 IN ({','.join('?' * len(chunk))})",
                (provider, feature, api_version, *chunk),
            )
            for sha256, answer in rows:
                found[sha256] = Annotation(**json.loads(answer))
        return found

    def put(self, provider: str, feature: str, api_version: str, sha256: str, annotation: Annotation) -> None:
        with self._connection() as db:
            db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                (provider, feature, sha256, api_version, json.dumps(annotation.to_dict()), time.time()),
            )
