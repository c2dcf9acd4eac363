"""`onnxconet agent`: the device side of `--target http://host:port`, a small HTTP server that times ONNX files.

It serves the runner protocol (`runner.py serve`) over HTTP to a client holding its token, and nothing else:

    GET    /v1/identity                      what this device is (runner.identity())
    GET    /v1/models/SHA256                 200 when the model is here, else 404
    PUT    /v1/models/SHA256                 upload a model (the body: one self-contained .onnx file)
    POST   /v1/jobs                          wait for the device (one job at a time), then {"job": ID}
    POST   /v1/jobs/ID/runners               start a runner process in the job: {"runner": RID}
    POST   /v1/jobs/ID/runners/RID           one runner request ({"op": "load", "model": "sha256:..."}, "time",
                                             "measure", "unload", "identity"); the runner's answer
    DELETE /v1/jobs/ID/runners/RID, /v1/jobs/ID    stop a runner / end the job (its runners stop)

Guards (each has a test in tests/test_agent.py): binds 127.0.0.1 unless `--host` says otherwise; every request
without `Authorization: Bearer TOKEN` (compared in constant time) gets 401 before its body is read; uploads
over `--max-upload-mb` get 413 unread; an upload must be ONNX that parses, whose name is its SHA-256 (64 hex
digits: no path can be named), with no external data (nothing outside the upload is ever opened); models are
written only into a private temporary folder (mode 0700) that is removed at exit; runners only ever load
models by their hash; one job at a time (others wait in a queue, up to `--queue-seconds`); a job is ended
after `--job-seconds` or 60 s without a request, and per-request timing is capped; every request is logged
with the client's address.

A well-kept server library: Python's own `http.server` (ThreadingHTTPServer), so the device needs nothing
beyond what the runner needs (Python, numpy, onnxruntime; and onnx to check uploads).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import onnx

from onnxconet.errors import LatencyError
from onnxconet.latency import runner as runner_module
from onnxconet.latency.process import RunnerProcess, onnx_tensors

log = logging.getLogger("onnxconet.agent")

_SHA = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[0-9a-f]{16}$")
OPS = ("identity", "load", "unload", "time", "measure")
LOAD_FIELDS = ("provider", "threads", "batch", "input_shape", "strict", "spin", "config", "label")
MAX_JSON = 1 << 20
MAX_RUNNERS = 4
IDLE_SECONDS = 60.0
CAPS = {"seconds": 10.0, "warmup_seconds": 5.0, "max_seconds": 60.0, "max_runs": 100_000, "warmup": 10_000}


class Refused(Exception):
    """A request the agent answers with `status` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def check_onnx(data: bytes) -> None:
    """Refuse anything but a self-contained ONNX model (Refused 400 with the reason)."""
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:2] == b"PK":
        raise Refused(400, "this is a pickle or zip file (a torch checkpoint?), not ONNX; send an .onnx file")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise Refused(400, f"not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node or model.ir_version <= 0:
        raise Refused(400, "not an ONNX model (no graph)")

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx_tensors(model.graph)):
        raise Refused(400, "the model references external data files; send one self-contained .onnx file")


class Job:
    def __init__(self, deadline: float) -> None:
        self.id = secrets.token_hex(8)
        self.deadline = deadline
        self.last = time.monotonic()
        self.runners: dict[str, RunnerProcess] = {}
        self.lock = threading.Lock()  # one request at a time per job


class Agent:
    """The agent's state: its token, private folder, models, the device's one job and its queue."""

    def __init__(
        self,
        token: str,
        *,
        max_upload: int = 512 << 20,
        job_seconds: float = 600.0,
        queue_seconds: float = 600.0,
        idle_seconds: float = IDLE_SECONDS,
        folder: str | None = None,
    ) -> None:
        if len(token) < 16:
            raise LatencyError("the agent's token must have at least 16 characters")
        self.token = token.encode()
        self.max_upload = max_upload
        self.job_seconds = job_seconds
        self.queue_seconds = queue_seconds
        self.idle_seconds = idle_seconds
        self.folder = tempfile.mkdtemp(prefix="onnxconet-agent-", dir=folder)  # 0700
        self.trt_cache = os.path.join(self.folder, "trt")
        self.device = threading.Semaphore(1)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.identity = runner_module.identity()
        self._stop = threading.Event()
        threading.Thread(target=self._reaper, daemon=True, name="agent-reaper").start()

    # ---------------------------------------------------------------------------------------------- auth
    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), self.token)

    # -------------------------------------------------------------------------------------------- models
    def model_path(self, sha: str) -> str:
        if not _SHA.match(sha):
            raise Refused(400, "a model is named by its SHA-256: 64 lowercase hex digits")
        return os.path.join(self.folder, sha + ".onnx")

    def put_model(self, sha: str, data: bytes) -> dict:
        path = self.model_path(sha)
        if hashlib.sha256(data).hexdigest() != sha:
            raise Refused(400, "the upload's SHA-256 is not the name it was sent under")
        check_onnx(data)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return {"sha256": sha, "bytes": len(data)}

    # ---------------------------------------------------------------------------------------------- jobs
    def open_job(self, client: str) -> dict:
        if not self.device.acquire(timeout=self.queue_seconds):
            raise Refused(503, f"the device stayed busy for {self.queue_seconds:.0f} s; try again later")
        job = Job(time.monotonic() + self.job_seconds)
        with self.lock:
            self.jobs[job.id] = job
        log.info("job %s opened for %s", job.id, client)
        return {"job": job.id}

    def job(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id) if _ID.match(job_id) else None
        if job is None:
            raise Refused(
                404, f"no job {job_id[:20]!r} (ended, or timed out after {self.idle_seconds:.0f} s idle)"
            )
        if time.monotonic() > job.deadline:
            self.end_job(job.id, "ran past its time cap")
            raise Refused(410, f"job {job_id} ran past the agent's {self.job_seconds:.0f} s cap per job")
        job.last = time.monotonic()
        return job

    def end_job(self, job_id: str, why: str = "ended") -> None:
        with self.lock:
            job = self.jobs.pop(job_id, None)
        if job is None:
            return
        for r in job.runners.values():
            r.close()
        self.device.release()
        log.info("job %s %s", job_id, why)

    def _reaper(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self.lock:
                stale = [
                    j.id for j in self.jobs.values() if now > j.deadline or now - j.last > self.idle_seconds
                ]
            for job_id in stale:
                self.end_job(job_id, "ended by the agent (idle or over its time cap)")

    def start_runner(self, job_id: str) -> dict:
        job = self.job(job_id)
        with job.lock:
            if len(job.runners) >= MAX_RUNNERS:
                raise Refused(429, f"a job runs at most {MAX_RUNNERS} runners")
            rid = secrets.token_hex(8)
            job.runners[rid] = RunnerProcess(
                timeout=max(CAPS["max_seconds"], CAPS["seconds"]) + 120,
                argv=[sys.executable, runner_module.__file__, "serve"],
            )
        return {"runner": rid}

    def runner_request(self, job_id: str, rid: str, req: dict) -> dict:
        job = self.job(job_id)
        op = req.get("op")
        if op not in OPS:
            raise Refused(400, f"op {op!r} is not one of {', '.join(OPS)}")
        clean: dict = {"op": op}
        if op == "load":
            name = str(req.get("model", ""))
            if not name.startswith("sha256:"):
                raise Refused(400, "load names a model by sha256:HEX (upload it first)")
            path = self.model_path(name[len("sha256:") :])
            if not os.path.isfile(path):
                raise Refused(404, f"no model {name[:20]}...; upload it first")
            clean |= {k: req[k] for k in LOAD_FIELDS if k in req}
            clean |= {"model": path, "trt_cache_dir": self.trt_cache}
        for key, cap in CAPS.items():
            if key in req:
                try:
                    value = float(req[key])
                except (TypeError, ValueError):
                    raise Refused(400, f"{key} must be a number") from None
                clean[key] = min(value, cap) if value >= 0 else 0
        for key in ("min_runs", "rel_ci"):
            if key in req:
                clean[key] = req[key]
        with job.lock:
            runner = job.runners.get(rid)
            if runner is None:
                raise Refused(404, f"no runner {rid[:20]!r} in job {job_id}")
            fields = {k: v for k, v in clean.items() if k != "op"}
            try:
                answer = runner.request(op, **fields)
            except LatencyError as e:  # the runner refused (no such provider, cannot load) or died
                answer = {"ok": False, "error": str(e), "cpu_s": runner.cpu_s}
        if not answer.get("ok"):  # the client named its model by hash: the agent's folder stays its own
            answer["error"] = str(answer.get("error", "")).replace(self.folder + os.sep, "")
        job.last = time.monotonic()
        return answer

    def stop_runner(self, job_id: str, rid: str) -> dict:
        job = self.job(job_id)
        with job.lock:
            runner = job.runners.pop(rid, None)
        if runner is None:
            raise Refused(404, f"no runner {rid[:20]!r} in job {job_id}")
        runner.close()
        return {}

    def close(self) -> None:
        self._stop.set()
        for job_id in list(self.jobs):
            self.end_job(job_id, "ended: the agent stops")
        shutil.rmtree(self.folder, ignore_errors=True)


class Handler(BaseHTTPRequestHandler):
    server_version = "onnxconet-agent"
    protocol_version = "HTTP/1.1"
    agent: Agent  # set on the subclass made by `make_server`

    def log_message(self, fmt: str, *args) -> None:  # http.server's access log -> ours
        log.info("%s %s", self.client_address[0], fmt % args)

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self, limit: int) -> bytes:
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise Refused(411, "send a Content-Length") from None
        if n < 0 or n > limit:
            self.close_connection = True  # the body stays unread
            raise Refused(413, f"body of {n} bytes is over the agent's limit of {limit} bytes")
        return self.rfile.read(n)

    def _json(self) -> dict:
        try:
            body = json.loads(self._body(MAX_JSON) or b"{}")
        except ValueError:
            raise Refused(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        return body

    def _route(self, method: str) -> None:
        who = f"{self.client_address[0]}:{self.client_address[1]}"
        try:
            if not self.agent.authorized(self.headers.get("Authorization")):
                self.close_connection = True
                log.warning("%s %s %s refused: no or wrong token", who, method, self.path[:80])
                raise Refused(401, "missing or wrong token (Authorization: Bearer TOKEN)")
            parts = self.path.split("?", 1)[0].strip("/").split("/")
            if parts[:1] != ["v1"]:
                raise Refused(404, "unknown path")
            parts = parts[1:]
            a = self.agent
            if method == "GET" and parts == ["identity"]:
                answer = a.identity | {"max_upload": a.max_upload}
            elif parts[:1] == ["models"] and len(parts) == 2 and method in ("GET", "PUT"):
                if method == "GET":
                    if not os.path.isfile(a.model_path(parts[1])):
                        raise Refused(404, "no such model")
                    answer = {"sha256": parts[1]}
                else:
                    answer = a.put_model(parts[1], self._body(a.max_upload))
                    log.info("%s uploaded model %s (%d bytes)", who, parts[1][:12], answer["bytes"])
            elif method == "POST" and parts == ["jobs"]:
                self._json()
                answer = a.open_job(who)
            elif parts[:1] == ["jobs"] and len(parts) == 2 and method == "DELETE":
                a.job(parts[1])
                a.end_job(parts[1])
                answer = {}
            elif parts[:1] == ["jobs"] and len(parts) == 3 and parts[2] == "runners" and method == "POST":
                self._json()
                answer = a.start_runner(parts[1])
            elif parts[:1] == ["jobs"] and len(parts) == 4 and parts[2] == "runners":
                if method == "POST":
                    req = self._json()
                    answer = a.runner_request(parts[1], parts[3], req)
                    log.info("%s job %s runner %s: %s", who, parts[1], parts[3][:8], req.get("op"))
                elif method == "DELETE":
                    answer = a.stop_runner(parts[1], parts[3])
                else:
                    raise Refused(405, f"{method} not allowed here")
            else:
                raise Refused(404, f"no {method} {self.path[:80]}")
            self._answer(200, answer)
        except Refused as e:
            self._answer(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - the agent keeps serving; the client gets one line
            log.exception("%s %s %s failed", who, method, self.path[:80])
            self._answer(500, {"error": f"{type(e).__name__}: {e}"[:300]})

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._route("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")


def make_server(agent: Agent, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """The agent's HTTP server on (host, port) (port 0: any free port); `serve_forever()` runs it."""
    handler = type("AgentHandler", (Handler,), {"agent": agent})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
