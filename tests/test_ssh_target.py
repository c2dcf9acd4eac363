"""`--target ssh://...`: the runner copied to the device and driven over SSH, against a real sshd on loopback that
this module starts (its own host key, client key and authorized_keys; `tools/install_services.sh` installs
openssh-server where it is missing)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest

from onnxconet.errors import LatencyError
from onnxconet.latency import device as devices
from onnxconet.latency.profile import PairedMeasurer, Target, measure
from tests.loopback_sshd import SSHD, free_port, keygen, loopback_sshd
from tests.onnx_builders import small_cnn
from tests.remote_checks import assert_isolated_ratio_is_local

SMALL = small_cnn().SerializeToString()
LARGE = small_cnn(width=48, layers=3).SerializeToString()

pytestmark = pytest.mark.skipif(
    SSHD is None or shutil.which("ssh") is None,
    reason="no OpenSSH server/client here: run tools/install_services.sh (installs openssh-server with apt)",
)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """(url, ssh options, folder) of an sshd on 127.0.0.1 that lets this user in with a key made here."""
    with loopback_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def ssh_device(sshd, monkeypatch):
    url, opts, _ = sshd
    monkeypatch.setenv(devices.SSH_ARGS_ENV, " ".join(opts))
    devices._DEVICES.pop(url, None)
    dev = devices.connect(url)
    yield url, dev
    dev.close()
    devices._DEVICES.pop(url, None)


def test_ssh_measures_what_local_measures(ssh_device):
    url, dev = ssh_device
    ident = dev.identity()
    assert ident["host"] == socket.gethostname() and ident["protocol"] == 1
    remote = Target(provider="cpu", threads=1, device=url)
    stats = measure(LARGE, remote, max_seconds=0.5)
    assert stats.provider == "CPUExecutionProvider" and stats.threads == 1
    # the file against itself on the larger model: SMALL runs in ~20 us, where two processes differ by 2x
    # (0.50-1.09 over 6 pairs of SMALL against itself, seen in CI)
    with PairedMeasurer(LARGE, remote) as m:  # over SSH the runners live across candidates, as locally
        pid = id(m.ref)
        r1 = m.compare(SMALL, max_seconds=0.5)
        r2 = m.compare(LARGE, max_seconds=0.5)
        assert id(m.ref) == pid
    assert r1.ratio < 1 / 1.5 and 0.7 < r2.ratio < 1.4
    assert_isolated_ratio_is_local(remote)  # fresh processes, both models well above ~20 us
    folder = dev._dir
    assert subprocess.run(["test", "-d", folder]).returncode == 0
    dev.close()
    assert subprocess.run(["test", "-e", folder]).returncode != 0  # the device's folder is removed


def test_ssh_failures_are_one_line_naming_the_target(sshd, tmp_path):
    url, opts, d = sshd
    keygen(tmp_path / "stranger")
    stranger = [*opts[:-2], "-i", str(tmp_path / "stranger")]
    with pytest.raises(LatencyError, match=r"refused the SSH login"):
        devices.SshDevice(url, ssh_args=[*stranger, "-o", f"IdentityFile={tmp_path}/stranger"]).identity()
    closed = url.replace(url.split(":")[2].split("?")[0], str(free_port()))
    with pytest.raises(LatencyError, match=r"cannot reach the device"):
        devices.SshDevice(closed, ssh_args=opts).identity()
    fake = tmp_path / "python-without-onnxruntime"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import onnxruntime_is_not_here' \"$@\"\n")
    fake.chmod(0o755)
    with pytest.raises(LatencyError, match=r"cannot time ONNX.*pip install onnxruntime"):
        devices.SshDevice(url.split("?")[0] + f"?python={fake}", ssh_args=opts).identity()
