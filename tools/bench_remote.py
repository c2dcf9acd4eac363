"""Remote = local? The same ONNX files timed here, through `onnxconet agent` on loopback and over SSH to a loopback
sshd, and what a remote candidate costs on top (upload, sessions, round trips).

    python tools/bench_remote.py [--models resnet18,mobilenet_v2] [--repeat 5] [--threads 1] [--json OUT]

Prints, per model, the median latency each way (median over --repeat alternated measurements, each a fresh
process: `profile.measure`) and remote / local; the deployed ratio between the models each way
(`measure_isolated`); and the wall time of one in-loop candidate measurement (`PairedMeasurer.compare`, resnet18
against itself, a new file each time so it is uploaded) local vs remote: the difference is the overhead.
Needs sshd (tools/install_services.sh) for the SSH rows; without it they are left out, and said so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxconet.latency import device as devices  # noqa: E402
from onnxconet.latency.agent import Agent, make_server  # noqa: E402
from onnxconet.latency.profile import PairedMeasurer, Target, measure, measure_isolated  # noqa: E402
from onnxconet.prepare import prepare  # noqa: E402
from tests.loopback_sshd import SSHD, loopback_sshd  # noqa: E402


def _variant(data: bytes, i: int) -> bytes:
    """The same model as a different file (another producer version string): a new hash, so a new upload."""
    import onnx

    m = onnx.load_model_from_string(data)
    m.producer_version = f"bench-{i}-{time.time_ns()}"
    return m.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=5, help="in-loop candidate measurements per way")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    files = {}
    for name in args.models.split(","):
        files[name] = prepare(f"torchvision:{name}").onnx_model.SerializeToString()
        print(f"{name}: {len(files[name]) / 2**20:.1f} MB", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    token = "bench-token-0123456789abcdef"
    agent = Agent(token, folder=str(tmp))
    server = make_server(agent, port=0)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    ways = {"local": "", "agent": f"http://127.0.0.1:{server.server_address[1]}"}
    devices.connect(ways["agent"], token)
    ssh_ctx = None
    if SSHD:
        (tmp / "sshd").mkdir()
        ssh_ctx = loopback_sshd(tmp / "sshd")
        url, opts, _ = ssh_ctx.__enter__()
        import os
        import shlex

        os.environ[devices.SSH_ARGS_ENV] = shlex.join(opts)
        ways["ssh"] = url
        devices.connect(url)
    else:
        print("no sshd here: the SSH rows are left out (tools/install_services.sh installs it)")
    targets = {w: Target(provider="cpu", threads=args.threads, device=u) for w, u in ways.items()}
    out: dict = {"threads": args.threads, "repeat": args.repeat, "models": {}, "ratio": {}, "overhead": {}}
    try:
        for name, data in files.items():
            med = {w: [] for w in ways}
            for _ in range(args.repeat):
                for w, t in targets.items():  # alternated: a slow phase of the machine hits every way
                    med[w].append(measure(data, t, max_seconds=1.0).median_ms)
            row = {w: float(np.median(v)) for w, v in med.items()}
            spread = {w: (max(v) - min(v)) / np.median(v) for w, v in med.items()}
            out["models"][name] = {"median_ms": row, "spread": spread, "runs": med}
            print(
                f"{name}: " + ", ".join(f"{w} {row[w]:.3f} ms (spread {spread[w]:.0%})" for w in ways) + "; "
                + ", ".join(f"{w}/local {row[w] / row['local']:.3f}" for w in ways if w != "local"),
                flush=True,
            )  # fmt: skip
        names = list(files)
        if len(names) >= 2:
            a, b = names[1], names[0]
            ratio = {
                w: measure_isolated(files[a], files[b], t, pairs=6, seconds=0.5).ratio
                for w, t in targets.items()
            }
            out["ratio"] = {"pair": f"{a}/{b}", **ratio}
            print(
                f"deployed ratio {a}/{b}: " + ", ".join(f"{w} {r:.3f}" for w, r in ratio.items()), flush=True
            )
        ref = files[names[0]]
        for w, t in targets.items():
            walls, uploads = [], []
            with PairedMeasurer(ref, t) as m:
                for i in range(args.candidates):
                    cand = _variant(ref, i)
                    dev = t.on()
                    t0 = time.perf_counter()
                    with dev.model_path(cand):
                        pass
                    uploads.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    m.compare(_variant(ref, 1000 + i), max_seconds=0.5)
                    walls.append(time.perf_counter() - t0)
            out["overhead"][w] = {"compare_s": walls, "upload_s": uploads}
            print(
                f"{names[0]} in-loop candidate, {w}: {np.median(walls):.2f} s per compare (timing capped at 0.5 s), "
                f"upload {np.median(uploads):.2f} s",
                flush=True,
            )
        local = float(np.median(out["overhead"]["local"]["compare_s"]))
        for w in ways:
            if w != "local":
                extra = float(np.median(out["overhead"][w]["compare_s"])) - local
                out["overhead"][w]["extra_s"] = extra
                print(f"overhead per candidate, {w} - local: {extra:+.2f} s", flush=True)
    finally:
        server.shutdown()
        agent.close()
        for dev in list(devices._DEVICES.values()):
            dev.close()
        if ssh_ctx is not None:
            ssh_ctx.__exit__(None, None, None)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
