"""Async job records in the output store (local or S3), so every gateway replica sees every job and a job
outlives the replica that ran it.

`STORE/jobs/<id>.json` is the record, written whole by the replica running the job (and by the one that takes
it over); `STORE/jobs/<id>.deleted` is a tombstone only DELETE writes, so a runner can never overwrite a
cancellation. `STORE/jobs/<id>.progress.<row id>.json` is a row's denoising steps while a model replica renders
it (cluster/step_progress.py), folded into the record's `progress` by the runner. Blocking calls: the gateway
runs them in threads.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from storage.fs import delete, exists, join, list_files, read_bytes, write_bytes

KINDS = {"video": "video", "audio": "audio", "mesh": "mesh", "image": "image"}  # task -> id prefix and object
ACTIVE = ("queued", "in_progress")
FINISHED = ("completed", "failed")
_ID = re.compile(r"(video|audio|mesh|image)_[0-9a-f]{32}")
# What clients see: OpenAI's video object fields, plus the output format, count and our usage figures.
PUBLIC = ("id", "object", "status", "progress", "created_at", "completed_at", "expires_at", "model", "prompt", "size",
          "seconds", "quality", "error", "remixed_from_video_id", "output_format", "n", "usage", "render_usage")


def new_id(task: str) -> str:
    return f"{KINDS[task]}_{uuid.uuid4().hex}"


def valid_id(job_id: str) -> bool:
    """Ids are ours alone: anything else is a 404 before it can name a path."""
    return _ID.fullmatch(job_id) is not None


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in PUBLIC}


class JobStore:
    """Job records under one output store."""

    def __init__(self, store: str):
        self.root = join(store, "jobs")

    def _path(self, job_id: str, suffix: str = ".json") -> str:
        return join(self.root, f"{job_id}{suffix}")

    def read(self, job_id: str) -> dict[str, Any] | None:
        """The record, or None when it does not exist or was deleted."""
        if not valid_id(job_id) or exists(self._path(job_id, ".deleted")):
            return None
        try:
            return json.loads(read_bytes(self._path(job_id)))
        except FileNotFoundError:
            return None

    def write(self, record: dict[str, Any]) -> None:
        write_bytes(self._path(record["id"]), json.dumps(record).encode(), "application/json")

    def deleted(self, job_id: str) -> bool:
        return exists(self._path(job_id, ".deleted"))

    def mark_deleted(self, job_id: str) -> None:
        """The tombstone: the job is gone for clients; its runner cancels and the sweeper removes its files."""
        write_bytes(self._path(job_id, ".deleted"), json.dumps({"at": time.time()}).encode(), "application/json")

    def all(self) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Every record, and every tombstone (id -> when it was written)."""
        records, tombs = [], {}
        for uri in list_files(self.root):
            name = uri.rsplit("/", 1)[-1]
            job_id, _, suffix = name.partition(".")
            if not valid_id(job_id) or suffix not in ("json", "deleted"):  # step progress is read by its runner only
                continue
            try:
                data = json.loads(read_bytes(uri))
            except (FileNotFoundError, ValueError):
                continue  # removed or being replaced meanwhile
            if suffix == "deleted":
                tombs[job_id] = float(data.get("at", 0))
            elif suffix == "json":
                records.append(data)
        return records, tombs

    def progress_uri(self, job_id: str, row_id: str) -> str:
        """Where a model replica writes one row's denoising steps while it renders (it deletes it after)."""
        return self._path(job_id, f".progress.{row_id}.json")

    def read_progress(self, job_id: str, row_ids: list[str]) -> dict[str, float]:
        """Each rendering row's fraction of steps done (0..1); rows with no progress key are left out (not
        rendering yet, or their call has ended), a key that cannot be understood reads 0."""
        seen = {}
        for row_id in row_ids:
            try:
                data = json.loads(read_bytes(self.progress_uri(job_id, row_id)))
            except FileNotFoundError:
                continue
            except ValueError:
                data = {}
            try:
                done, total = int(data["steps_done"]), int(data["steps_total"])
            except (KeyError, TypeError, ValueError):
                done, total = 0, 0
            seen[row_id] = min(1.0, max(0.0, done / total)) if total > 0 else 0.0
        return seen

    def purge(self, job_id: str, record: dict[str, Any] | None) -> None:
        """Removes a job's outputs (and their video thumbnails), uploads, step progress, record and tombstone."""
        record = record or {}
        progress = [self.progress_uri(job_id, row["id"]) for row in record.get("rows", []) if row.get("id")]
        for uri in [*record.get("outputs", []), *filter(None, record.get("thumbnails", [])), *record.get("uploads", {}),
                    *progress]:
            delete(uri)
        delete(self._path(job_id))
        delete(self._path(job_id, ".deleted"))


class StepFold:
    """A running job's `progress` from its rows' step keys, read by its runner once per heartbeat."""

    def __init__(self, rows: int):
        self.rows = rows
        self.best: dict[str, float] = {}  # row id -> the best step fraction seen

    def fold(self, previous: int, seen: dict[str, float]) -> int:
        """Never lower than `previous`, and never 100: only completion says 100 (after the last step the outputs
        are still finished and stored). A key seen before and gone now means its call ended: every step done."""
        for row_id in self.best.keys() - seen.keys():
            self.best[row_id] = 1.0
        for row_id, fraction in seen.items():
            self.best[row_id] = max(self.best.get(row_id, 0.0), fraction)
        if self.rows <= 0:
            return previous
        return max(previous, min(99, int(100 * sum(self.best.values()) / self.rows)))
