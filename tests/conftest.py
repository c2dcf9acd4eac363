"""What many test modules share: the tiny reference models, and a small learnable dataset shaped for them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from onnxconet.prepare import prepare
from onnxconet.search.config import SearchConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny_models.py") + ":tiny_res"
MIX = str(ROOT / "tests" / "data" / "tiny_models.py") + ":mix"
RESNET20 = str(ROOT / "models" / "resnet_cifar.py") + ":resnet20"


def search_cfg(tmp_path, data: str, **kw) -> SearchConfig:
    """A quick search of the tiny model on `data` (FLOPs budget: no timing noise), into tmp_path/run: anneal, whose
    trials the driver's machinery (history, resume, workers) runs through; `kw` overrides any field."""
    base = dict(
        model=TINY, data=data, strategy="anneal", trials=3, epochs_per_trial=1, final_epochs=1, pretrain_epochs=2, batch_size=32,
        budget="0.6", budget_on="flops", provider="cpu", threads=1, latency_seconds=0.2, deployed_pairs=2,
        out=str(tmp_path / "run"), min_ratio=0.25,
    )  # fmt: skip
    return SearchConfig(**(base | kw))


def tiny_search_args(data: str, *extra: str, trials: int = 2, latency_seconds: float = 0.2) -> list[str]:
    """`onnxconet search` arguments (without the command and --out) of a quick search of the tiny model on `data`:
    anneal, a FLOPs budget (no timing noise), one epoch each of pretraining, trial and final fine-tuning."""
    return [
        TINY, "--data", data, "--strategy", "anneal", "--trials", str(trials), "--epochs-per-trial", "1", "--final-epochs", "1",
        "--pretrain-epochs", "1", "--batch-size", "32", "--budget", "0.6", "--budget-on", "flops",
        "--provider", "cpu", "--threads", "1", "--latency-seconds", str(latency_seconds), "--min-ratio", "0.25",
        "--deployed-pairs", "1",  # FLOPs decide the budget: the deployed figure is reported, not judged
        *extra,
    ]  # fmt: skip


@contextmanager
def search_process(out, *extra: str, trials: int = 2):
    """`python -m onnxconet search` of the built-in model and data (this checkout's code) into `out`, in its own
    process group (a terminal's Ctrl-C reaches the whole group); anneal (its trials are what an interrupt and
    --resume are about); small and fast: a FLOPs budget, no pretraining, 200
    training digits, no final fine-tuning, one pair of processes for the deployed figure. Yields the Popen; on
    the way out the group is killed if still running."""
    args = [
        sys.executable, "-m", "onnxconet", "search", "--strategy", "anneal", "--budget-on", "flops", "--budget", "0.6",
        "--trials", str(trials), "--pretrain-epochs", "0", "--final-epochs", "0", "--train-samples", "200",
        "--provider", "cpu", "--threads", "1", "--latency-seconds", "0.2", "--deployed-pairs", "1",
        "--out", str(out), *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        preexec_fn=_sigint_default,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


AGENT_TOKEN = "test-token-0123456789abcdef"


@contextmanager
def running_agent(tmp_path, **kw):
    """An `onnxconet agent` (its token AGENT_TOKEN) serving on a free loopback port from a thread of this process;
    yields (the Agent, its port). `kw`: Agent's caps."""
    from onnxconet.latency.agent import Agent, make_server

    agent = Agent(AGENT_TOKEN, folder=str(tmp_path), **kw)
    server = make_server(agent, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield agent, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        agent.close()


def _sigint_default() -> None:
    """In the child: SIGINT back to its default, so Python installs its KeyboardInterrupt handler. A test run
    started in the background of a non-interactive shell (`.ci/run &`) inherits SIGINT ignored, and Python keeps
    an ignored SIGINT ignored: the Ctrl-C test then sees a search that cannot be interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll `condition()` every 0.1 s until it holds; fail the test after `timeout` seconds (a hang guard: on a
    loaded machine a niced search runs many times slower than alone)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tiny():
    """The tiny residual CNN exported and grouped (per module: a search may freeze its groups)."""
    return prepare(TINY)


@pytest.fixture(scope="module")
def tiny_graph(tiny):
    return tiny.graph


@pytest.fixture(scope="module")
def r20():
    return prepare(RESNET20)


@pytest.fixture(scope="session")
def npz_data(tmp_path_factory):
    """A learnable 5-class problem shaped like the tiny model's input: class = which quadrant is bright."""
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 5, n)
    x = rng.normal(0, 0.3, (n, 3, 16, 16)).astype(np.float32)
    for i, c in enumerate(y):
        x[i, :, (c // 2) * 8 : (c // 2) * 8 + 8, (c % 2) * 8 : (c % 2) * 8 + 8] += 1.0 + 0.5 * (c == 4)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x, y=y)
    return f"npz:{path}"
