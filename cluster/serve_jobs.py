"""Async jobs in the shape of OpenAI's video API, for renders that take longer than an HTTP request should.

`POST /v1/videos` (multipart, as the openai SDK sends it, or JSON) and any generation request with
`"job": true` or `Prefer: respond-async` answer at once with a job object; `GET …/{id}`, `GET …/{id}/content`
(for a video also `variant=thumbnail`, its first frame), `GET` (list) and `DELETE …/{id}` follow it, under
`/v1/videos`, `/v1/audio/jobs`, `/v1/meshes/jobs` and `/v1/images/jobs`. Records live in the output store
(cluster/job_store.py): the replica that creates a job runs it and writes a heartbeat; any replica takes over a
job whose heartbeat is older than the lease (up to `job_attempts` runs, then it is failed), and deletes finished
jobs, their outputs, thumbnails and uploads, after the retention. A mixin of the Gateway (cluster/serve_app.py).
"""

import asyncio
import hashlib
import logging
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from cluster.api import APIError, VideoGenerationRequest, invalid
from cluster.gateway_http import app
from cluster.job_store import ACTIVE, FINISHED, JobStore, StepFold, new_id, public
from pipelines.media.formats import format_for_path
from pipelines.media.thumbnails import video_thumbnail
from storage.fs import is_remote, read_bytes, write_bytes

log = logging.getLogger(__name__)

PREFIXES = {"/v1/videos": "video", "/v1/audio/jobs": "audio", "/v1/meshes/jobs": "mesh", "/v1/images/jobs": "image"}
VARIANTS = {"video": ("video", "thumbnail")}  # content variants per job kind; other kinds serve their output only
_CHUNK = 1024 * 1024


def owner_of(key: str) -> str:
    """Who may see a job: a hash of its API key (never the key itself in the store)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def thumbnail(uri: str) -> tuple[bytes, str, str]:
    """A video output's first frame as a still: (bytes, extension, content type)."""
    fmt = format_for_path(uri)
    return video_thumbnail(read_bytes(uri), fmt.name if fmt else "mp4")


def store_thumbnails(outputs: list[str]) -> list[str | None]:
    """Each video output's thumbnail, written beside it (`<output>.thumbnail.webp`, purged with the job's outputs);
    None where one could not be made (the content route then makes it on request)."""
    stored: list[str | None] = []
    for uri in outputs:
        try:
            data, ext, mime = thumbnail(uri)
            target = f"{uri.rsplit('.', 1)[0]}.thumbnail.{ext}"
            write_bytes(target, data, mime)
            stored.append(target)
        except Exception:  # noqa: BLE001 - a missing thumbnail never fails the job
            log.exception("cannot make the thumbnail of %s", uri)
            stored.append(None)
    return stored


def _kind(request: Request) -> str:
    """The job kind a route serves, from its path (after any application route prefix)."""
    path = request.url.path
    path = path[path.find("/v1/"):]
    for prefix, kind in PREFIXES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return kind
    raise APIError(404, f"no job route at {path}", code="not_found")


class JobRoutes:
    """Job routes and runners (the Gateway provides config, catalog, models, metrics, keys and the request path)."""

    config: Any
    metrics: dict[str, Any]
    keys: Any

    def start_jobs(self) -> None:
        """The store's jobs, this replica's runners, and the sweeper that takes over and expires jobs."""
        self.job_store = JobStore(self.config.store)
        self.runner_id = uuid.uuid4().hex
        self.running: dict[str, asyncio.Task] = {}
        self.sweeper: asyncio.Task | None = None  # started from the replica's event loop (health checks, job routes)

    def _ensure_sweeper(self) -> None:
        if self.sweeper is None or self.sweeper.done():
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def check_health(self) -> None:
        """Serve's periodic health check: also keeps this replica's job sweeper running."""
        self._ensure_sweeper()

    # -- creating and running ----------------------------------------------------------------

    async def create_job(self, key: str, task: str, entry: Any, body: Any, rows: list[dict], stored: dict[str, str],
                         quality: str | None) -> dict:
        try:
            records, _ = await asyncio.to_thread(self.job_store.all)
            active = sum(r["status"] in ACTIVE and r.get("owner") == owner_of(key) for r in records)
            self.keys.check_jobs(key, active, self.metrics)
        except BaseException:
            await self._discard(stored)
            raise
        now = int(time.time())
        first = rows[0]
        size = f"{first['width']}x{first['height']}" if first.get("width") else getattr(body, "size", None)
        seconds = getattr(body, "seconds", None)
        record = {
            "id": new_id(task), "object": task, "status": "queued", "progress": 0, "created_at": now,
            "completed_at": None, "expires_at": None, "model": entry.name, "prompt": body.prompt, "size": size,
            "seconds": None if seconds is None else str(seconds), "quality": quality, "error": None,
            "remixed_from_video_id": None, "output_format": first["output_format"], "n": len(rows),
            "owner": owner_of(key), "rows": rows, "uploads": stored, "outputs": [], "attempts": 1,
            "runner": self.runner_id, "heartbeat": time.time(), "route": f"{task}-jobs",
        }
        await asyncio.to_thread(self.job_store.write, record)
        self._launch(record)
        self.metrics["requests"].labels(entry.name, record["route"], "200").inc()
        return public(record)

    def _launch(self, record: dict) -> None:
        self._ensure_sweeper()
        task = asyncio.get_running_loop().create_task(self._run(record))
        self.running[record["id"]] = task
        task.add_done_callback(lambda _: self.running.pop(record["id"], None))

    async def _run(self, record: dict) -> None:
        """Renders a job's rows, writing heartbeats (and queued -> in_progress) until it completes or fails."""
        entry = self.catalog.pipeline(record["model"])
        rows = [dict(r, progress_uri=self.job_store.progress_uri(record["id"], r["id"])) for r in record["rows"]]
        render = asyncio.ensure_future(self.run_rows(record["route"], entry, rows, False, record["uploads"]))
        steps = StepFold(len(record["rows"]))
        try:
            while not render.done():
                if await asyncio.to_thread(self.job_store.deleted, record["id"]):
                    render.cancel()  # the model replica deletes what the cancelled rows wrote
                    return
                state = await self.placement.state(entry.name, fresh=record["status"] == "queued")
                if record["status"] == "queued" and state is not None and state.running:
                    record["status"] = "in_progress"
                if record["status"] == "in_progress":
                    await self._fold_steps(record, steps)
                record["heartbeat"] = time.time()
                await asyncio.to_thread(self.job_store.write, record)
                await asyncio.wait({render}, timeout=min(1.0, self.config.job_lease_s / 3)
                                   if record["status"] == "queued" else self.config.job_lease_s / 3)
            results = render.result()
        except asyncio.CancelledError:
            render.cancel()
            raise
        except APIError as e:
            return await self._finish(record, "failed", error={"code": e.code, "message": e.message})
        except Exception as e:  # noqa: BLE001 - a job never stays in progress
            log.exception("job %s failed", record["id"])
            return await self._finish(record, "failed", error={"code": "internal_error", "message": type(e).__name__})
        from cluster.api import usage_fields

        usage = usage_fields(results, record["output_format"], record["quality"])
        record.update(outputs=[r["output_uri"] for r in results], usage=usage["usage"], render_usage=usage["render_usage"])
        if record["object"] == "video":
            record["thumbnails"] = await asyncio.to_thread(store_thumbnails, record["outputs"])
        await self._finish(record, "completed")

    async def _fold_steps(self, record: dict, steps: StepFold) -> None:
        """Moves `progress` with the rows' denoising steps (read once per heartbeat, written with it)."""
        try:
            rows = [r["id"] for r in record["rows"]]
            seen = await asyncio.to_thread(self.job_store.read_progress, record["id"], rows)
        except Exception:  # noqa: BLE001 - progress is a courtesy; the heartbeat must still be written
            log.warning("job %s: cannot read step progress", record["id"], exc_info=True)
            return
        record["progress"] = steps.fold(record.get("progress") or 0, seen)

    async def _finish(self, record: dict, status: str, error: dict | None = None) -> None:
        if await asyncio.to_thread(self.job_store.deleted, record["id"]):  # cancelled meanwhile: publish nothing
            await asyncio.to_thread(self.job_store.purge, record["id"], record)
            return
        now = int(time.time())
        record.update(status=status, error=error, completed_at=now, expires_at=now + int(self.config.job_retention_s),
                      progress=100 if status == "completed" else record["progress"], heartbeat=time.time())
        await asyncio.to_thread(self.job_store.write, record)
        self.metrics["requests"].labels(record["model"], record["route"], "200" if status == "completed" else "500").inc()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.config.job_lease_s / 3))
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - the store may be briefly unreachable; try again next round
                log.exception("job sweep failed")

    async def sweep(self) -> None:
        """Takes over jobs whose runner went quiet, fails those out of attempts, and expires finished ones."""
        records, tombs = await asyncio.to_thread(self.job_store.all)
        now = time.time()
        by_id = {r["id"]: r for r in records}
        for job_id, at in tombs.items():
            if job_id not in self.running and now - at > 2 * self.config.job_lease_s:
                await asyncio.to_thread(self.job_store.purge, job_id, by_id.get(job_id))
        for record in records:
            job_id = record["id"]
            if job_id in tombs or job_id in self.running:
                continue
            if record["status"] in FINISHED:
                if record.get("expires_at") and now >= record["expires_at"]:
                    await asyncio.to_thread(self.job_store.purge, job_id, record)
            elif now - record.get("heartbeat", 0) > self.config.job_lease_s:
                await self._take_over(record)

    async def _take_over(self, record: dict) -> None:
        if record.get("attempts", 1) >= self.config.job_attempts:
            await self._finish(record, "failed", error={
                "code": "internal_error", "message": f"the job's worker was lost {record['attempts']} times"})
            return
        record.update(attempts=record.get("attempts", 1) + 1, runner=self.runner_id, heartbeat=time.time(),
                      status="queued")
        await asyncio.to_thread(self.job_store.write, record)
        await asyncio.sleep(0.2)  # another replica claiming at the same moment: the last write wins, the other backs off
        current = await asyncio.to_thread(self.job_store.read, record["id"])
        if current is not None and current.get("runner") == self.runner_id:
            log.warning("job %s: its runner went quiet; resuming it here (run %d)", record["id"], record["attempts"])
            self._launch(current)

    async def count_jobs(self) -> None:
        """The jobs gauge, by status, from the store."""
        records, tombs = await asyncio.to_thread(self.job_store.all)
        for status in (*ACTIVE, *FINISHED):
            self.metrics["jobs"].labels(status).set(sum(r["status"] == status and r["id"] not in tombs for r in records))

    # -- routes ----------------------------------------------------------------------------------

    @app.post("/v1/videos")
    async def create_video(self, request: Request) -> dict:
        key = self._auth(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=64, max_part_size=self.config.max_upload_bytes)
            if any(hasattr(v, "read") for v in form.values()):
                raise APIError(400, "input_reference: image-to-video is not served here", param="input_reference",
                               code="invalid_input")
            fields: dict[str, Any] = dict(form.items())
            for name in ("loras", "embeddings"):
                if isinstance(fields.get(name), str):
                    fields[name] = self.form_json(name, fields[name])
            body = self._validated(VideoGenerationRequest, fields)
        else:
            body = await self._body(request, VideoGenerationRequest)
        body = body.model_copy(update={"job": True})
        return await self.generate(request, key, "videos", "video", body)

    def _own(self, request: Request, job_id: str) -> tuple[str, dict]:
        key = self._auth(request)
        record = self.job_store.read(job_id)
        if record is None or record["object"] != _kind(request) or record.get("owner") != owner_of(key):
            raise APIError(404, f"no job {job_id!r}", param="id", code="not_found")
        return key, record

    @app.get("/v1/videos/{job_id}")
    @app.get("/v1/audio/jobs/{job_id}")
    @app.get("/v1/meshes/jobs/{job_id}")
    @app.get("/v1/images/jobs/{job_id}")
    async def retrieve_job(self, request: Request, job_id: str) -> dict:
        self._ensure_sweeper()
        _, record = await asyncio.to_thread(self._own, request, job_id)
        return public(record)

    @app.get("/v1/videos")
    @app.get("/v1/audio/jobs")
    @app.get("/v1/meshes/jobs")
    @app.get("/v1/images/jobs")
    async def list_jobs(self, request: Request, after: str | None = None, limit: int = 20, order: str = "desc") -> dict:
        key = self._auth(request)
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            raise invalid([{"loc": ("order" if order not in ("asc", "desc") else "limit",), "msg": "asc|desc, 1..100"}])
        records, tombs = await asyncio.to_thread(self.job_store.all)
        mine = sorted((r for r in records if r["id"] not in tombs and r["object"] == _kind(request)
                       and r.get("owner") == owner_of(key)), key=lambda r: (r["created_at"], r["id"]),
                      reverse=order == "desc")
        ids = [r["id"] for r in mine]
        start = ids.index(after) + 1 if after in ids else 0
        page = mine[start:start + limit]
        return {"object": "list", "data": [public(r) for r in page], "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(mine)}

    @app.delete("/v1/videos/{job_id}")
    @app.delete("/v1/audio/jobs/{job_id}")
    @app.delete("/v1/meshes/jobs/{job_id}")
    @app.delete("/v1/images/jobs/{job_id}")
    async def delete_job(self, request: Request, job_id: str) -> dict:
        """Cancels a queued or running job (its outputs are never published) or deletes a finished one."""
        _, record = await asyncio.to_thread(self._own, request, job_id)
        await asyncio.to_thread(self.job_store.mark_deleted, job_id)
        local = self.running.get(job_id)
        if local is not None:
            local.cancel()
        if record["status"] in FINISHED:
            await asyncio.to_thread(self.job_store.purge, job_id, record)
        return {"id": job_id, "object": f"{record['object']}.deleted", "deleted": True}

    @app.get("/v1/videos/{job_id}/content", response_class=Response)
    @app.get("/v1/audio/jobs/{job_id}/content", response_class=Response)
    @app.get("/v1/meshes/jobs/{job_id}/content", response_class=Response)
    @app.get("/v1/images/jobs/{job_id}/content", response_class=Response)
    async def job_content(self, request: Request, job_id: str, variant: str = "video", index: int = 0) -> Response:
        """The job's output (variant `video`, the SDK's default), or for video jobs `thumbnail`: the first frame as
        an image (WebP, as OpenAI's). Other kinds take any variant but thumbnail and spritesheet."""
        _, record = await asyncio.to_thread(self._own, request, job_id)
        if record["status"] != "completed":
            raise APIError(409, f"job {job_id} is {record['status']}; its content exists once it is completed",
                           code="job_not_completed")
        kind, variants = record["object"], VARIANTS.get(record["object"], ("video",))
        if variant not in variants and (kind == "video" or variant in ("thumbnail", "spritesheet")):
            raise APIError(400, f"variant {variant!r} is not available for {kind} jobs (available: {', '.join(variants)})",
                           param="variant", code="invalid_value")
        if not 0 <= index < len(record["outputs"]):
            raise APIError(400, f"index {index}: the job has {len(record['outputs'])} outputs", param="index",
                           code="invalid_value")
        uri = record["outputs"][index]
        if variant == "thumbnail":
            stored = (record.get("thumbnails") or [])[index:index + 1]
            if not (stored and stored[0]):  # none kept (it failed, or the job is older than thumbnails): make it now
                try:
                    data, _, mime = await asyncio.to_thread(thumbnail, uri)
                except FileNotFoundError:
                    raise APIError(404, "the job's output no longer exists", code="file_not_found") from None
                return Response(data, media_type=mime)
            uri = stored[0]
        fmt = format_for_path(uri)
        media = fmt.mime if fmt else "application/octet-stream"
        if is_remote(uri):
            return Response(await asyncio.to_thread(read_bytes, uri), media_type=media)
        try:
            handle = open(uri, "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise APIError(404, "the job's output no longer exists", code="file_not_found") from None

        def chunks():
            with handle:
                while block := handle.read(_CHUNK):
                    yield block

        return StreamingResponse(chunks(), media_type=media)
