"""Where latency is measured: this machine, or an edge device reached over SSH or through its agent.

Every measurement (`profile.py`) asks the target's `Device` for runner processes (`runner.py serve`, the same
JSON lines everywhere) and for a device-side name of each model:

- `LocalDevice` (`--target` not given): runner subprocesses here, models as files here.
- `SshDevice` (`ssh://[user@]host[:port][?python=python3]`): `runner.py` is copied once into a private folder
  that `mktemp -d` makes on the device, and every runner is `ssh host python3 DIR/runner.py serve`: the JSON
  lines travel over the SSH channel. One connection is reused (OpenSSH's ControlMaster); models are uploaded
  once each, named by their SHA-256. The device needs Python, numpy and onnxruntime, no listening port; the
  user's keys and ~/.ssh/config apply (extra ssh options: the ONNXCONET_SSH_ARGS environment variable).
- `AgentDevice` (`http://host:port`): `onnxconet agent` on the device (`agent.py`); models uploaded once by
  SHA-256, runners started and driven over HTTP inside a *job* (the agent runs one job at a time: timings of
  two clients at once would both be wrong). The token: `--token` or the ONNXCONET_TOKEN environment variable.

The runner times on the device, so network time is never part of a latency. A device's `identity()` (CPU,
cores, onnxruntime, providers, host) keys the latency cache, so figures of two machines never mix.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxconet.errors import LatencyError
from onnxconet.latency import runner as runner_module
from onnxconet.latency.process import RunnerProcess, model_file, onnx_tensors

LOCAL = ""  # Target.device of this machine
LOCAL_NAME = "local"  # how results name it (Target.device_name)
TOKEN_ENV = "ONNXCONET_TOKEN"
SSH_ARGS_ENV = "ONNXCONET_SSH_ARGS"
_SHA = re.compile(r"^[0-9a-f]{64}$")


def check_url(url: str) -> str:
    """`url` if it names a device this module can reach ("" = this machine), else LatencyError."""
    if url == LOCAL:
        return url
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("ssh", "http", "https") or not urllib.parse.urlsplit(url).hostname:
        raise LatencyError(
            f"--target {url!r}: use ssh://user@host[:port] (the device over SSH) or http://host:port (its "
            "`onnxconet agent`)"
        )
    return url


def model_bytes(model) -> bytes:
    """The bytes of `model` (a path, bytes or ModelProto) to send to a device; external data cannot travel."""
    with model_file(model) as path:
        m = onnx.load(path, load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx_tensors(m.graph)):
            raise LatencyError(
                f"{path} keeps its weights in external data files; a device takes one self-contained .onnx "
                "(save it without external data, < 2 GB)"
            )
        return Path(path).read_bytes()


class Device:
    """This machine: runner subprocesses, models as local files (the base of the remote devices)."""

    url = LOCAL
    local = True
    keeps_runners = True  # runners may live across measurements (the agent's end with each job)

    def __init__(self) -> None:
        self._identity: dict | None = None

    def identity(self) -> dict:
        """What the device is (`runner.identity()` there)."""
        if self._identity is None:
            self._identity = runner_module.identity()
        return self._identity

    def physical_cores(self) -> int:
        return int(self.identity()["physical_cores"])

    def cache_fields(self) -> dict:
        """The device's part of a latency cache key."""
        return {"host": f"{socket.gethostname()}/{platform.processor() or platform.machine()}",
                "onnxruntime": ort.__version__}  # fmt: skip

    def runner(self, timeout: float = 600.0):
        """A fresh runner process (has `request`, `cpu_s`, `close`; a context manager)."""
        return RunnerProcess(timeout=timeout)

    @contextmanager
    def model_path(self, model):
        """The name a runner's `load` request gives for `model`, valid inside the block."""
        with model_file(model) as path:
            yield path

    @contextmanager
    def job(self):
        """Hold the device for one measurement (the agent queues other clients meanwhile)."""
        yield

    def describe(self) -> str:
        return "this machine"

    def close(self) -> None:
        pass


class _Remote(Device):
    local = False

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._uploaded: set[str] = set()
        self._lock = threading.RLock()  # uploads make the SSH folder first

    def cache_fields(self) -> dict:
        ident = self.identity()
        return {"host": f"{ident['host']}/{ident['cpu']}", "onnxruntime": ident["onnxruntime"],
                "device": self.url}  # fmt: skip

    def describe(self) -> str:
        ident = self.identity()
        return f"{self.url} ({ident['cpu']}, {ident['physical_cores']} cores, onnxruntime {ident['onnxruntime']})"

    @contextmanager
    def model_path(self, model):
        data = model_bytes(model)
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            if sha not in self._uploaded:
                self._upload(sha, data)
                self._uploaded.add(sha)
        yield self._name(sha)

    def _upload(self, sha: str, data: bytes) -> None:
        raise NotImplementedError

    def _name(self, sha: str) -> str:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------ SSH
def _ssh_reason(last: str) -> str:
    """Why an ssh command failed whose stderr ended with `last`, and what to do (one line; the caller names the
    device)."""
    low = last.lower()
    if "permission denied" in low or "authentication" in low:
        return (
            f"the device refused the SSH login ({last}); check that `ssh` to it works without a "
            "password prompt (a key in ssh-agent or ~/.ssh/config)"
        )
    if "no module named" in low:
        return (
            f"the device's Python cannot time ONNX ({last}); install there `pip install onnxruntime "
            "numpy`, or name another interpreter with ?python=PATH"
        )
    if any(
        w in low for w in ("could not resolve", "connection refused", "timed out", "no route", "closed by")
    ):
        return f"cannot reach the device ({last}); check the host, port and network"
    return last or "ssh failed without a message"


class SshDevice(_Remote):
    """A device reached with the system's OpenSSH client (see the module docstring)."""

    def __init__(self, url: str, ssh_args: list[str] | None = None) -> None:
        super().__init__(url)
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        self.python = query.get("python", ["python3"])[0]
        dest = parts.hostname if not parts.username else f"{parts.username}@{parts.hostname}"
        self._control = tempfile.mkdtemp(prefix="onnxconet-ssh-")
        extra = ssh_args if ssh_args is not None else shlex.split(os.environ.get(SSH_ARGS_ENV, ""))
        self._base = [
            "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15",
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self._control}/%C", "-o", "ControlPersist=300",
            *extra, *(["-p", str(parts.port)] if parts.port else []), dest,
        ]  # fmt: skip
        self._dir: str | None = None

    def _ssh(self, command: str, data: bytes | None = None, timeout: float = 300.0) -> str:
        try:
            done = subprocess.run(
                [*self._base, command], input=data, capture_output=True, timeout=timeout,
                start_new_session=True,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise LatencyError(f"{self.url}: no answer within {timeout:.0f} s; check the device") from None
        except OSError as e:
            raise LatencyError(f"cannot run ssh for {self.url}: {e}; install the OpenSSH client") from e
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise LatencyError(f"{self.url}: {_ssh_reason(lines[-1][:300] if lines else '')}")
        return done.stdout.decode(errors="replace")

    def _folder(self) -> str:
        """The private folder on the device, made (with runner.py in it) on first use."""
        with self._lock:
            if self._dir is None:
                source = Path(runner_module.__file__).read_bytes()
                out = self._ssh('d=$(mktemp -d "${TMPDIR:-/tmp}/onnxconet-XXXXXX") && cat > "$d/runner.py" '
                                '&& echo "$d"', data=source).strip()  # fmt: skip
                if not out.startswith("/"):
                    raise LatencyError(
                        f"{self.url}: could not make a folder on the device (got {out[:80]!r})"
                    )
                self._dir = out
                atexit.register(self.close)
            return self._dir

    def identity(self) -> dict:
        if self._identity is None:
            d = self._folder()
            out = self._ssh(f"{shlex.quote(self.python)} {shlex.quote(d + '/runner.py')} identity")
            try:
                self._identity = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise LatencyError(f"{self.url}: the device's runner answered {out[:120]!r}") from None
        return self._identity

    def runner(self, timeout: float = 600.0):
        self.identity()  # a clear error (no onnxruntime there, login refused) before any runner starts
        command = f"{shlex.quote(self.python)} {shlex.quote(self._folder() + '/runner.py')} serve"
        return RunnerProcess(
            timeout=timeout, argv=[*self._base, command], new_session=True, name=self.url,
            explain=lambda last: ": " + _ssh_reason(last),
        )  # fmt: skip

    def _upload(self, sha: str, data: bytes) -> None:
        d = shlex.quote(self._folder())
        self._ssh(f"cat > {d}/{sha}.part && mv {d}/{sha}.part {d}/{sha}.onnx", data=data)

    def _name(self, sha: str) -> str:
        return f"{self._folder()}/{sha}.onnx"

    def close(self) -> None:
        if self._dir is not None:
            try:
                self._ssh(f"rm -rf {shlex.quote(self._dir)}", timeout=30)
            except LatencyError:
                pass
            self._dir = None
            subprocess.run([*self._base[:-1], "-O", "exit", self._base[-1]], capture_output=True, timeout=30)
        shutil.rmtree(self._control, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- agent
class AgentDevice(_Remote):
    """A device running `onnxconet agent` (agent.py), driven over HTTP with its bearer token."""

    keeps_runners = False

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0) -> None:
        super().__init__(url.rstrip("/"))
        self.token = token or os.environ.get(TOKEN_ENV, "")
        if not self.token:
            raise LatencyError(
                f"{self.url}: no token for the agent; pass the one it printed with --token or {TOKEN_ENV}"
            )
        self.timeout = timeout
        self._job: str | None = None
        self._depth = 0

    def call(self, method: str, path: str, body: bytes | dict | None = None, timeout: float | None = None):
        """One HTTP request to the agent; its JSON answer. Failures are LatencyError naming the agent."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header(
                "Content-Type", "application/json" if isinstance(body, dict) else "application/octet-stream"
            )
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                why = json.loads(e.read()).get("error", "")
            except ValueError:
                why = e.reason
            if e.code == 401:
                raise LatencyError(
                    f"{self.url}: the agent refused the token; pass the one it printed with --token or "
                    f"{TOKEN_ENV}"
                ) from None
            raise LatencyError(f"{self.url}: the agent answered {e.code} to {method} {path}: {why}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise LatencyError(
                f"{self.url}: cannot reach the agent ({reason}); start `onnxconet agent` on the device or fix "
                "--target"
            ) from None

    def identity(self) -> dict:
        if self._identity is None:
            self._identity = self.call("GET", "/v1/identity")
        return self._identity

    @contextmanager
    def job(self):
        with self._lock:
            self._depth += 1
            if self._job is None:
                self._job = self.call("POST", "/v1/jobs", {})["job"]
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                job, self._job = (self._job, None) if self._depth == 0 else (None, self._job)
            if job is not None:
                try:
                    self.call("DELETE", f"/v1/jobs/{job}", timeout=60)
                except LatencyError:
                    pass  # the agent ends idle jobs itself

    def runner(self, timeout: float = 600.0):
        if self._job is None:
            raise LatencyError("internal: a runner on an agent needs an open job (Device.job())")
        return AgentRunner(self, self._job, timeout)

    def _upload(self, sha: str, data: bytes) -> None:
        limit = int(self.identity().get("max_upload", 0))
        if limit and len(data) > limit:
            raise LatencyError(
                f"{self.url}: the model is {len(data) / 2**20:.1f} MB, over the agent's limit of "
                f"{limit / 2**20:.0f} MB; restart it with a larger --max-upload-mb"
            )
        try:
            self.call("GET", f"/v1/models/{sha}")
            return  # the agent has it
        except LatencyError as e:
            if " 404 " not in str(e):
                raise
        self.call("PUT", f"/v1/models/{sha}", data)

    def _name(self, sha: str) -> str:
        return f"sha256:{sha}"


class AgentRunner:
    """A runner process on the agent's device, with `RunnerProcess`'s interface."""

    def __init__(self, device: AgentDevice, job: str, timeout: float) -> None:
        self.device, self.job, self.timeout = device, job, timeout
        self.id = device.call("POST", f"/v1/jobs/{job}/runners", {})["runner"]
        self.cpu_s = 0.0

    def request(self, op: str, timeout: float | None = None, **fields) -> dict:
        answer = self.device.call(
            "POST", f"/v1/jobs/{self.job}/runners/{self.id}", {"op": op, **fields}, timeout or self.timeout
        )
        self.cpu_s = float(answer.get("cpu_s", self.cpu_s))
        if not answer.get("ok"):
            raise LatencyError(f"{self.device.url}: {answer.get('error') or 'the runner refused ' + op}")
        return answer

    def close(self) -> None:
        try:
            self.device.call("DELETE", f"/v1/jobs/{self.job}/runners/{self.id}", timeout=30)
        except LatencyError:
            pass

    def kill(self) -> None:
        self.close()

    def __enter__(self) -> AgentRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- registry
_DEVICES: dict[str, Device] = {LOCAL: Device()}
_REGISTRY_LOCK = threading.Lock()


def connect(url: str, token: str | None = None) -> Device:
    """The device at `url` ("" = this machine), connected once per process and reused; asks for its identity
    so that an unreachable device or a refused token fails here, with one line."""
    check_url(url)
    with _REGISTRY_LOCK:
        dev = _DEVICES.get(url)
        if dev is None or (token and isinstance(dev, AgentDevice) and dev.token != token):
            dev = SshDevice(url) if url.startswith("ssh://") else AgentDevice(url, token)
            _DEVICES[url] = dev
    dev.identity()
    return dev


def token_of(url: str) -> str | None:
    """The token this process holds for the agent at `url` (None: not an agent, or none given)."""
    dev = _DEVICES.get(url)
    return dev.token if isinstance(dev, AgentDevice) else None


def get(url: str) -> Device:
    """`connect` without a token argument (the agent's from ONNXCONET_TOKEN, or the one given earlier)."""
    return _DEVICES.get(url) or connect(url)
