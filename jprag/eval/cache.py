"""A resumable, append-only cache of generated answers, one JSONL file per method.

Answering hundreds of questions with ten methods takes hours on a CPU; a run killed in the
middle must not answer again what it already answered. `AnswerCache` appends one line per
question as soon as its batch is generated (flushed and fsynced), keyed by everything the
answer depends on:

* the run `fingerprint`: the model and every setting that shapes prompts or adapters (the
  caller hashes its config; see `jprag.pipeline.answer_fingerprint`), and
* per question: its id, text and the ids of the documents it is answered with.

A line whose key does not match (another configuration wrote it) is ignored, and a torn last
line (the process died mid-write) is dropped, so a stale or damaged cache costs time, never
correctness.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class AnswerCache:
    """Outputs already generated for one method, read from and appended to `path` (JSONL)."""

    def __init__(self, path: str | os.PathLike, run_fingerprint: str):
        self.path = pathlib.Path(path)
        self.run_fingerprint = run_fingerprint
        self._outputs: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._outputs[row["key"]] = row["output"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line: that question is answered again

    def key(self, question_id: str, question: str, doc_ids: Sequence[str]) -> str:
        return fingerprint([self.run_fingerprint, question_id, question, list(doc_ids)])

    def get(self, key: str) -> str | None:
        return self._outputs.get(key)

    def __len__(self) -> int:
        return len(self._outputs)

    def add(self, items: Iterable[tuple[str, str]]) -> None:
        """Record `(key, output)` pairs durably (appended, flushed and fsynced)."""
        items = list(items)
        if not items:
            return
        from jprag.distributed import is_primary

        if not is_primary():  # multi-host: every process answers alike, process 0 records
            self._outputs.update(items)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, output in items:
                f.write(json.dumps({"key": key, "output": output}) + "\n")
                self._outputs[key] = output
            f.flush()
            os.fsync(f.fileno())

