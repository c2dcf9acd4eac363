"""`onnxconet agent` and `--target http://...`: its guards (each test fails without its guard), its queue, and
measurements through it that agree with the local profiler."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import onnx
import pytest

from onnxconet.errors import LatencyError
from onnxconet.latency import device as devices
from onnxconet.latency.profile import PairedMeasurer, Target, measure
from tests.conftest import AGENT_TOKEN as TOKEN
from tests.conftest import ROOT, _sigint_default, running_agent
from tests.onnx_builders import small_cnn
from tests.remote_checks import assert_isolated_ratio_is_local

SMALL = small_cnn().SerializeToString()
LARGE = small_cnn(width=48, layers=3).SerializeToString()


@pytest.fixture
def agent(tmp_path):
    with running_agent(tmp_path, max_upload=1 << 20) as a:
        yield a


def call(port, method, path, body=b"", token=TOKEN, headers=None):
    """(status, JSON answer) of one raw request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Authorization": f"Bearer {token}"} if token is not None else {}
    conn.request(method, path, body=body, headers=h | (headers or {}))
    r = conn.getresponse()
    status, data = r.status, r.read()
    conn.close()
    return status, json.loads(data or b"{}")


def put(port, data, token=TOKEN, name=None):
    return call(port, "PUT", f"/v1/models/{name or hashlib.sha256(data).hexdigest()}", data, token)


# ------------------------------------------------------------------------------------------------ guards
def test_no_token_and_wrong_token_are_refused(agent):
    a, port = agent
    assert call(port, "GET", "/v1/identity")[0] == 200
    for token in (None, "", "wrong-token-of-enough-length", TOKEN[:-1], TOKEN + "x"):
        status, body = call(port, "GET", "/v1/identity", token=token)
        assert status == 401 and "token" in body["error"]
        assert put(port, SMALL, token=token)[0] == 401
    assert not [f for f in os.listdir(a.folder) if f.endswith(".onnx")]  # nothing was written


def test_oversized_upload_is_refused_unread(agent):
    a, port = agent
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("PUT", "/v1/models/" + "0" * 64)
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(a.max_upload + 1))
    conn.endheaders()  # no body sent: the answer must come without the agent reading one
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]
    conn.close()
    assert not os.listdir(a.folder)
    big = small_cnn(width=256, layers=4).SerializeToString()
    assert len(big) > a.max_upload
    dev = devices.AgentDevice(f"http://127.0.0.1:{port}", token=TOKEN)
    with pytest.raises(LatencyError, match="max-upload-mb"), dev.model_path(big):
        pass


def test_only_onnx_is_accepted(agent, tmp_path):
    a, port = agent
    for data in (b"not a model at all" * 10, pickle.dumps({"weight": [1.0, 2.0]}), b"PK\x03\x04zipped"):
        status, body = put(port, data)
        assert status == 400 and ("ONNX" in body["error"] or "pickle" in body["error"]), body
    assert put(port, SMALL)[0] == 200
    assert os.listdir(a.folder) == [hashlib.sha256(SMALL).hexdigest() + ".onnx"]


def test_external_data_models_are_refused(agent, tmp_path):
    _, port = agent
    path = tmp_path / "ext.onnx"
    onnx.save(small_cnn(), path, save_as_external_data=True,
              location="ext.data", size_threshold=0)  # fmt: skip
    status, body = put(port, path.read_bytes())
    assert status == 400 and "external data" in body["error"]


def test_names_are_hashes_no_path_tricks(agent, tmp_path):
    a, port = agent
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(SMALL)
    for name in ("..%2F..%2Fetc%2Fpasswd", "../x", "A" * 64, hashlib.sha256(SMALL).hexdigest()[:63]):
        assert put(port, SMALL, name=name)[0] in (400, 404)
    other = hashlib.sha256(b"x").hexdigest()
    assert put(port, SMALL, name=other)[1]["error"].startswith("the upload's SHA-256")  # name = content
    job = call(port, "POST", "/v1/jobs", b"{}")[1]["job"]
    rid = call(port, "POST", f"/v1/jobs/{job}/runners", b"{}")[1]["runner"]
    # a model name that is a real file's path outside the agent's folder (../…/secret)
    outside = os.path.relpath(str(secret)[: -len(".onnx")], a.folder)
    assert os.path.isfile(os.path.join(a.folder, outside + ".onnx"))
    assert call(port, "GET", f"/v1/models/{outside.replace('/', '%2F')}")[0] in (400, 404)
    for model in (str(secret), "sha256:" + outside, "sha256:../../" + str(secret), "sha256:" + "0" * 64):
        status, body = call(
            port, "POST", f"/v1/jobs/{job}/runners/{rid}", json.dumps({"op": "load", "model": model})
        )
        assert status in (400, 404), (model, body)
    status, body = call(port, "POST", f"/v1/jobs/{job}/runners/{rid}", json.dumps({"op": "quit"}))
    assert status == 400 and "op" in body["error"]
    call(port, "DELETE", f"/v1/jobs/{job}")
    assert sorted(os.listdir(a.folder)) == []  # only uploads ever land in the folder


def test_jobs_run_one_at_a_time(agent):
    _, port = agent
    first = call(port, "POST", "/v1/jobs", b"{}")[1]["job"]
    got = {}

    def second():
        got["job"] = call(port, "POST", "/v1/jobs", b"{}")[1]["job"]
        got["at"] = time.monotonic()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(1.0)
    assert "job" not in got  # queued behind the first
    released = time.monotonic()
    assert call(port, "DELETE", f"/v1/jobs/{first}")[0] == 200
    t.join(10)
    assert got["job"] != first and got["at"] >= released
    assert call(port, "DELETE", f"/v1/jobs/{got['job']}")[0] == 200


def test_idle_and_overlong_jobs_are_ended(tmp_path):
    with running_agent(tmp_path, idle_seconds=0.5, job_seconds=30) as (_, port):
        job = call(port, "POST", "/v1/jobs", b"{}")[1]["job"]
        time.sleep(2.0)  # the client went away: the reaper ends the job and frees the device
        assert call(port, "POST", f"/v1/jobs/{job}/runners", b"{}")[0] == 404
        assert call(port, "POST", "/v1/jobs", b"{}")[0] == 200
    with running_agent(tmp_path, job_seconds=0.5, queue_seconds=0.2) as (_, port):
        job = call(port, "POST", "/v1/jobs", b"{}")[1]["job"]
        time.sleep(0.8)
        assert call(port, "POST", f"/v1/jobs/{job}/runners", b"{}")[0] in (404, 410)


def test_timing_requests_are_capped(agent):
    a, port = agent
    assert put(port, SMALL)[0] == 200
    job = call(port, "POST", "/v1/jobs", b"{}")[1]["job"]
    rid = call(port, "POST", f"/v1/jobs/{job}/runners", b"{}")[1]["runner"]
    load = {"op": "load", "model": "sha256:" + hashlib.sha256(SMALL).hexdigest(), "provider": "cpu", "threads": 1,
            "trt_cache_dir": "/etc"}  # fmt: skip
    status, body = call(port, "POST", f"/v1/jobs/{job}/runners/{rid}", json.dumps(load))
    assert status == 200 and body["ok"] and body["provider"] == "CPUExecutionProvider"
    t0 = time.monotonic()
    req = {"op": "time", "seconds": 1e6, "warmup_seconds": 0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(__import__("onnxconet.latency.agent", fromlist=["CAPS"]).CAPS, "seconds", 0.3)
        status, body = call(port, "POST", f"/v1/jobs/{job}/runners/{rid}", json.dumps(req))
    assert status == 200 and body["ok"] and time.monotonic() - t0 < 10
    call(port, "DELETE", f"/v1/jobs/{job}")


def test_agent_binds_loopback_by_default_and_prints_its_token(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(devices.TOKEN_ENV, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxconet", "agent", "--port", "0"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_sigint_default,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("onnxconet agent on http://127.0.0.1:"), line
        url, token = line.split()[3], line.split()[5]
        assert len(token) >= 16
        port = int(url.rsplit(":", 1)[1])
        assert call(port, "GET", "/v1/identity", token=token)[0] == 200
        assert call(port, "GET", "/v1/identity", token=None)[0] == 401
        for family_addr in _other_addresses():
            with pytest.raises(OSError):
                http.client.HTTPConnection(family_addr, port, timeout=2).connect()
    finally:
        proc.terminate()
        proc.wait(20)
    assert "agent stopped" in proc.stderr.read()


def _other_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (the agent must not answer on them)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    except OSError:
        return []
    return [a for a in out if "." in a and not a.startswith("127.")]


# --------------------------------------------------------------------------------------------- the client
def test_client_errors_are_one_line_naming_the_agent(agent, tmp_path):
    _, port = agent
    with pytest.raises(LatencyError, match=r"refused the token"):
        devices.AgentDevice(f"http://127.0.0.1:{port}", token="wrong-token-of-enough-length").identity()
    with pytest.raises(LatencyError, match=r"cannot reach the agent"):
        devices.AgentDevice("http://127.0.0.1:9", token=TOKEN).identity()
    with pytest.raises(LatencyError, match=r"no token"):
        devices.AgentDevice(f"http://127.0.0.1:{port}", token="")
    with pytest.raises(LatencyError, match=r"--target"):
        Target(device="ftp://somewhere")


def test_measurements_through_the_agent_match_local(agent):
    _, port = agent
    url = f"http://127.0.0.1:{port}"
    dev = devices.connect(url, TOKEN)
    assert dev.identity()["physical_cores"] >= 1 and dev.identity()["onnxruntime"]
    remote = Target(provider="cpu", threads=1, device=url)
    assert remote.on() is dev and dev.cache_fields()["device"] == url
    stats = measure(LARGE, remote, max_seconds=0.5)
    assert stats.provider == "CPUExecutionProvider" and stats.threads == 1 and stats.runs >= 20
    # the file against itself on the larger model (SMALL runs in ~20 us: two processes can differ by 2x)
    with PairedMeasurer(LARGE, remote) as m:  # runners end with each job: another client may come between
        assert m.cand is None
        r1 = m.compare(SMALL, max_seconds=0.5)
        r2 = m.compare(LARGE, max_seconds=0.5)
    assert r1.ratio < 1 / 1.5 and 0.7 < r2.ratio < 1.4
    assert r1.load is None  # the device's load is not ours to see
    assert_isolated_ratio_is_local(remote)  # fresh processes, both models well above ~20 us


def test_a_runner_error_on_the_device_names_the_target(agent):
    _, port = agent
    url = f"http://127.0.0.1:{port}"
    devices.connect(url, TOKEN)
    bad = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT64, [1, 3])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [1, 3])],
        ),
        ir_version=8, opset_imports=[onnx.helper.make_opsetid("", 17)],
    )  # fmt: skip
    with pytest.raises(LatencyError, match=rf"{url}: .*float tensor") as e:
        measure(bad.SerializeToString(), Target(provider="cpu", threads=1, device=url), max_seconds=0.2)
    assert "onnxconet-agent-" not in str(e.value)  # the agent's own folder is not shown to clients
