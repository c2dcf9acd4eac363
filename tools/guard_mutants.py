"""Does each of the agent's guard tests fail without its guard? (issue 15: "each failing without its guard")

For every guard: copy this checkout's committed tree (`git archive HEAD`) to a temporary folder, remove the
guard there (one textual replacement, checked to apply exactly once), run the guard's test(s) against that copy,
and report whether they failed. A guard whose tests still pass without it is reported as NOT COVERED (exit 1).
The unmutated copy runs the same tests first: they must pass there.

    python tools/guard_mutants.py            # all guards
    python tools/guard_mutants.py --only token,upload-size
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGENT = "onnxconet/latency/agent.py"


@dataclass(frozen=True)
class Guard:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


GUARDS = [
    Guard("token", AGENT,
          "return hmac.compare_digest(header[len(\"Bearer \") :].strip().encode(), self.token)", "return True",
          ("tests/test_agent.py::test_no_token_and_wrong_token_are_refused",)),
    Guard("upload-size", AGENT, "if n < 0 or n > limit:", "if n < 0:",
          ("tests/test_agent.py::test_oversized_upload_is_refused_unread",)),
    Guard("onnx-only", AGENT, "def check_onnx(data: bytes) -> None:\n",
          "def check_onnx(data: bytes) -> None:\n    return\n",
          ("tests/test_agent.py::test_only_onnx_is_accepted",)),
    Guard("external-data", AGENT, "if any(t.data_location == onnx.TensorProto.EXTERNAL",
          "if False and any(t.data_location == onnx.TensorProto.EXTERNAL",
          ("tests/test_agent.py::test_external_data_models_are_refused",)),
    Guard("names-are-hashes", AGENT, "if not _SHA.match(sha):", "if False:",
          ("tests/test_agent.py::test_names_are_hashes_no_path_tricks",)),
    Guard("name-is-content", AGENT, "if hashlib.sha256(data).hexdigest() != sha:", "if False:",
          ("tests/test_agent.py::test_names_are_hashes_no_path_tricks",)),
    Guard("one-job-at-a-time", AGENT, "self.device = threading.Semaphore(1)", "self.device = threading.Semaphore(8)",
          ("tests/test_agent.py::test_jobs_run_one_at_a_time",)),
    Guard("timing-caps", AGENT, "clean[key] = min(value, cap) if value >= 0 else 0", "clean[key] = value",
          ("tests/test_agent.py::test_timing_requests_are_capped",)),
    Guard("idle-and-overlong-jobs", AGENT, "while not self._stop.wait(1.0):", "while False:",
          ("tests/test_agent.py::test_idle_and_overlong_jobs_are_ended",)),
    Guard("loopback-default", "onnxconet/cli/agent.py", '] = "127.0.0.1",', '] = "0.0.0.0",',
          ("tests/test_agent.py::test_agent_binds_loopback_by_default_and_prints_its_token",)),
]  # fmt: skip


def checkout(dest: Path) -> None:
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as t:
        t.extractall(dest, filter="data")


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[bool, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=tree, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    last = (p.stdout.strip().splitlines() or [""])[-1]
    return p.returncode == 0, time.monotonic() - t0, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated guard names (default: all)")
    args = ap.parse_args()
    guards = [g for g in GUARDS if not args.only or g.name in args.only.split(",")]
    if not guards:
        sys.exit(f"no guard named {args.only!r}; known: {', '.join(g.name for g in GUARDS)}")
    with tempfile.TemporaryDirectory(prefix="guard-mutants-") as tmp:
        base = Path(tmp) / "base"
        checkout(base)
        tests = tuple(dict.fromkeys(t for g in guards for t in g.tests))
        ok, secs, last = run_tests(base, tests)
        print(f"unmutated: {'pass' if ok else 'FAIL'} ({secs:.0f} s) {last}")
        if not ok:
            return 2
        uncovered = 0
        for g in guards:
            tree = Path(tmp) / g.name
            checkout(tree)
            path = tree / g.file
            text = path.read_text()
            if text.count(g.old) != 1:
                print(f"{g.name}: the guard's text is not found exactly once in {g.file}; update this tool")
                return 2
            path.write_text(text.replace(g.old, g.new))
            ok, secs, last = run_tests(tree, g.tests)
            uncovered += ok
            print(f"{g.name:24s} without its guard: {'NOT COVERED (tests pass)' if ok else 'tests fail'}"
                  f" ({secs:.0f} s) {last}")  # fmt: skip
        print(f"{len(guards) - uncovered}/{len(guards)} guards: their tests fail without them")
        return 1 if uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
