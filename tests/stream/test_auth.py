"""Strangers, over real sockets and real processes: CURVE keys (``rrstem keys``, ``--keys``), the warning for
sockets bound beyond this machine, and ``--read-only-control``.

A client without the server's key, or with keys the service never authorized, gets no snapshot, cannot stop
the service and gets no frame in; a client with the keys gets everything and its ``stop`` works.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from support import disc_frames, reference
from rrstem.gui.source import SnapshotSource
from rrstem.stream.auth import Curve, exposure_warning, is_local, make_keys
from rrstem.stream.control import ControlClient, ControlError, ControlTimeout
from rrstem.stream.results import read_scan
from rrstem.stream.service import Service, ServiceConfig

RRSTEM = [sys.executable, "-m", "rrstem.cli"]
ANY = "tcp://127.0.0.1:0"


def rrstem(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([*RRSTEM, *argv], capture_output=True, text=True, timeout=timeout)


class Serve:
    """``rrstem serve`` in its own process; its output lines are read up to the line that names its endpoints."""

    def __init__(self, *argv: str):
        self.proc = subprocess.Popen([*RRSTEM, "serve", "--no-train", "--no-progress", "--calibration-frames", "4",
                                      *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.head = []
        for line in self.proc.stdout:
            self.head.append(line)
            if line.startswith("rrstem serve: frames from"):
                break
        else:
            raise AssertionError("".join(self.head))
        self.frames = line.split("frames from ")[1].split(",")[0]
        self.publish = line.split("snapshots on ")[1].split(",")[0].replace("0.0.0.0", "127.0.0.1")
        self.control = line.split("control on ")[1].split(",")[0].replace("0.0.0.0", "127.0.0.1")

    def finish(self, timeout: float = 15.0) -> tuple[int, str]:
        """The exit code within ``timeout`` s, and all the output."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout} s:\n{''.join(self.head)}{self.proc.stdout.read()}")
        return code, "".join(self.head) + self.proc.stdout.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def keys(tmp_path):
    """(the service's keys, another folder's keys, a stranger who knows the server's public key only)."""
    good, wrong, stranger = tmp_path / "keys", tmp_path / "wrong", tmp_path / "stranger"
    make_keys(good)
    make_keys(wrong)
    stranger.mkdir()
    shutil.copy(wrong / "client.key_secret", stranger)  # a client key the service never authorized ...
    shutil.copy(good / "server.key", stranger)  # ... and the server's public key, which is no secret
    return good, wrong, stranger


def snapshots_received(endpoint: str, keys: list, seconds: float) -> list[int]:
    """Snapshots that a SUB with each of ``keys`` receives in ``seconds`` (the service beats at 1 Hz at least)."""
    sources = [SnapshotSource(endpoint, context=zmq.Context.instance(), keys=k) for k in keys]
    try:
        counts = [0] * len(sources)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for i, src in enumerate(sources):
                snap = src.poll(0.02)
                counts[i] += snap is not None
        return counts
    finally:
        for src in sources:
            src.close()


# --- rrstem keys ----------------------------------------------------------------------------------


def test_keys_makes_a_server_and_a_client_pair_with_private_secrets_and_never_overwrites(tmp_path):
    folder = tmp_path / "lab-keys"
    done = rrstem("keys", str(folder))
    assert done.returncode == 0, done.stderr
    for name in ("server.key_secret", "server.key", "client.key_secret", "authorized"):
        assert str(folder / name) in done.stdout  # it says which file goes where
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
    assert mode == {"server.key": 0o644, "server.key_secret": 0o600, "client.key": 0o644,
                    "client.key_secret": 0o600}  # authorized/client.key shares the name: checked next
    assert stat.S_IMODE((folder / "authorized" / "client.key").stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    public = zmq.auth.load_certificate(folder / "client.key")[0]
    assert zmq.auth.load_certificate(folder / "authorized" / "client.key")[0] == public
    server_public, server_secret = zmq.auth.load_certificate(folder / "server.key_secret")
    assert zmq.curve_public(server_secret) == server_public and server_public != public

    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    again = rrstem("keys", str(folder))
    assert again.returncode == 2 and "already holds keys" in again.stderr and "--force" in again.stderr
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # nothing touched

    forced = rrstem("keys", str(folder), "--force")
    assert forced.returncode == 0, forced.stderr
    assert zmq.auth.load_certificate(folder / "server.key")[0] != server_public  # new keys
    assert zmq.auth.load_certificate(folder / "authorized" / "client.key")[0] == \
        zmq.auth.load_certificate(folder / "client.key")[0]


# --- CURVE on: serve --keys in its own process ----------------------------------------------------


def test_with_curve_only_clients_with_the_keys_get_snapshots_control_the_service_and_send_frames(keys, tmp_path):
    good, wrong, stranger = keys
    out = tmp_path / "results.h5"
    serve = Serve("--bind", "--listen", ANY, "--publish", ANY, "--control", ANY, "--keys", str(good),
                  "--out", str(out))
    # a sender without the keys, from the start: it gets nothing in (its send times out, exit 1)
    stray = subprocess.Popen([*RRSTEM, "simulate", "--scan", "4x4", "--detector", "64", "--scan-id", "stray", "--to",
                              serve.frames, "--connect", "--timeout", "4", "--no-progress"],
                             stderr=subprocess.PIPE, text=True)
    try:
        # snapshots: the service publishes a heartbeat every second; strangers get none of them
        counts = snapshots_received(serve.publish, [good, None, wrong, stranger], 3.0)
        assert counts[0] >= 1 and counts[1:] == [0, 0, 0], counts

        # control: a stranger's stop gets no answer and stops nothing
        for other in (None, wrong, stranger):
            with ControlClient(serve.control, timeout=0.5, keys=other) as ctl, pytest.raises(ControlTimeout):
                ctl.request("stop")
        assert serve.proc.poll() is None  # still running ...
        with ControlClient(serve.control, timeout=5.0, keys=good) as ctl:  # ... and answering its own client
            assert ctl.request("status")["status"]["scan_id"] is None

        # frames: with the keys, a sender's scan lands whole
        frames = disc_frames(6, 5, seed=7)
        np.save(tmp_path / "scan.npy", frames)
        sent = rrstem("replay", str(tmp_path / "scan.npy"), "--scan-id", "keyed", "--to", serve.frames, "--connect",
                      "--keys", str(good), "--no-progress")
        assert sent.returncode == 0, sent.stderr
        with ControlClient(serve.control, timeout=5.0, keys=good) as ctl:
            deadline = time.monotonic() + 20
            while ctl.request("status")["status"]["state"] != "done":
                assert time.monotonic() < deadline, "the keyed scan did not finish"
                time.sleep(0.05)
            assert stray.wait(10) == 1 and "--keys" in stray.stderr.read()
            assert ctl.request("stop") == {"ok": True}
        code, output = serve.finish(15.0)
    finally:
        serve.kill()
        if stray.poll() is None:
            stray.kill()
    assert code == 0, output
    assert "refused a CURVE client" in output  # the stranger's key was logged (the keyless peers fail the handshake)
    with h5py.File(out, "r") as f:
        assert list(f["scans"]) == ["keyed"]  # nothing of the stray sender
    res = read_scan(out, "keyed")
    assert res["attrs"]["counters"]["received"] == 30 and res["attrs"]["counters"]["missing"] == 0
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"))
    np.testing.assert_array_equal(res["maps"]["vbf"], ref["vbf"])


def test_a_binding_sender_with_curve_sends_to_the_service_and_to_no_stranger(keys, tmp_path):
    """serve connects to a sender that binds (like a detector): the sender is the CURVE server, serve its client."""
    good, _, stranger = keys
    frames = disc_frames(5, 4, seed=9)
    np.save(tmp_path / "scan.npy", frames)
    sender = subprocess.Popen([*RRSTEM, "replay", str(tmp_path / "scan.npy"), "--to", ANY, "--keys", str(good),
                               "--no-progress", "--timeout", "20"], stderr=subprocess.PIPE, text=True)
    try:
        line = sender.stderr.readline()
        endpoint = line.split("bound ")[1].split(";")[0]
        ctx = zmq.Context.instance()
        thieves = []  # PULL sockets that would take a share of the frames, were they let in
        for who in (None, stranger):
            sock = ctx.socket(zmq.PULL)
            sock.linger = 0
            if who is not None:
                Curve(who, ctx).secure(sock, server=False)
            sock.connect(endpoint)
            thieves.append(sock)
        time.sleep(0.3)  # the thieves are connected (or refused) before the service comes
        out = tmp_path / "results.h5"
        serve = Serve("--listen", endpoint, "--publish", ANY, "--control", ANY, "--keys", str(good), "--out",
                      str(out), "--once")
        code, output = serve.finish(30.0)
        assert code == 0, output
        assert sender.wait(20) == 0, sender.stderr.read()
        assert [s.poll(0) for s in thieves] == [0, 0]  # not one message reached them
    finally:
        for s in locals().get("thieves", []):
            s.close()
        if sender.poll() is None:
            sender.kill()
    res = read_scan(out)
    assert res["attrs"]["counters"]["received"] == 20 and res["attrs"]["counters"]["missing"] == 0
    np.testing.assert_array_equal(res["maps"]["vbf"], reference(frames, res["attrs"]["geometry"],
                                                                res.get("pixel_mask"))["vbf"])


def test_missing_keys_are_said_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="rrstem keys"):
        ControlClient(ANY, keys=tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match=r"no client.key_secret in .*half"):
        ControlClient(ANY, keys=tmp_path / "half")
    done = rrstem("serve", "--bind", "--listen", ANY, "--publish", ANY, "--control", ANY, "--no-train",
                  "--keys", str(tmp_path / "half"), "--out", str(tmp_path / "r.h5"))
    assert done.returncode == 2 and "no server.key_secret in" in done.stderr, done.stderr


# --- the warning for sockets open to a network ----------------------------------------------------


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.4.5.6:1", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:1", True), ("ipc:///tmp/x", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://192.168.1.20:5555", False),
    ("tcp://[::]:1", False), ("tcp://eth0:5555", False), ("tcp://microscope-pc:5555", False)])
def test_which_endpoints_are_local(endpoint, local):
    assert is_local(endpoint) is local
    assert (exposure_warning([(endpoint, "control")]) is None) is local


def exposed(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rrstem.auth" and r.levelno == logging.WARNING
            and "beyond this machine" in r.getMessage()]


def test_binding_beyond_loopback_without_keys_warns_once_naming_each_socket(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="rrstem.auth")
    lan = "tcp://0.0.0.0:0"
    with Service(ServiceConfig(listen=lan, bind=True, publish=ANY, control=lan, out=None, train=False)) as svc:
        (message,) = exposed(caplog)
    assert f"{svc.listen_endpoint} (frames)" in message and f"{svc.control_endpoint} (control)" in message
    assert "(snapshots)" not in message  # published on loopback only
    assert "anyone on that network can send frames into the scans and control the service" in message
    assert "rrstem keys" in message and "--keys" in message

    caplog.clear()
    with Service(ServiceConfig(listen=ANY, bind=True, publish=ANY, control=ANY, out=None, train=False)):
        assert exposed(caplog) == []  # loopback: no warning
    make_keys(tmp_path / "k")
    with Service(ServiceConfig(listen=lan, bind=True, publish=lan, control=lan, out=None, train=False,
                               keys=tmp_path / "k")):
        assert exposed(caplog) == []  # CURVE on every socket: no warning


# --- read-only control ----------------------------------------------------------------------------


def test_read_only_control_refuses_what_changes_the_service_and_answers_the_rest(tmp_path):
    out, elsewhere = tmp_path / "results.h5", tmp_path / "elsewhere.h5"
    serve = Serve("--bind", "--listen", ANY, "--publish", ANY, "--control", "tcp://0.0.0.0:0",
                  "--read-only-control", "--out", str(out))
    try:
        assert any("WARNING rrstem.auth" in line and "(control)" in line and "anyone on that network" in line
                   for line in serve.head), "".join(serve.head)  # bound to every interface without keys: said
        with ControlClient(serve.control, timeout=5.0) as ctl:
            for cmd, args in (("stop", {}), ("reset_model", {}), ("pause_training", {}),
                              ("save", {"path": str(elsewhere)})):
                with pytest.raises(ControlError, match=r"^control is read-only: .*--read-only-control"):
                    ctl.request(cmd, **args)
            assert serve.proc.poll() is None and not elsewhere.exists()  # nothing changed
            assert ctl.request("status")["status"]["scan_id"] is None
        serve.proc.send_signal(signal.SIGTERM)  # the operator still stops it
        code, output = serve.finish(15.0)
    finally:
        serve.kill()
    assert code == 0, output
    assert output.count("refused control") == 4


def test_the_dashboard_with_the_keys_draws_the_snapshots_and_without_them_none(keys, tmp_path):
    good, _, _ = keys
    cfg = ServiceConfig(listen=ANY, bind=True, publish=ANY, control=ANY, out=None, train=False, keys=good)
    with Service(cfg) as svc:
        dashboards = [subprocess.Popen([*RRSTEM, "dashboard", "--connect", svc.publish_endpoint, "--offscreen",
                                        "--exit-after", "3", *extra], stderr=subprocess.PIPE, text=True)
                      for extra in (["--keys", str(good)], [])]
        drawn = []
        for proc in dashboards:
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            drawn.append(int(err.split("dashboard: ")[1].split()[0]))
    assert drawn[0] >= 1 and drawn[1] == 0, drawn


# --- a third-party sender written from docs/protocol.md alone -----------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_curve_sender(binds: bool) -> str:
    """The minimal sender with its socket lines replaced by the Authentication section's, as the page says."""
    text = DOC.read_text()
    blocks = lambda section: re.findall(r"```python\n(.*?)```", text[text.index(section):], re.S)  # noqa: E731
    sender = blocks("## Minimal sender")[0]
    server_lines, client_lines = blocks("## Authentication")[:2]
    head, rest = sender.split("ctx = zmq.Context()\n")
    _, tail = rest.split("sock.bind(ENDPOINT)\n")
    if binds:
        return head + server_lines + tail.replace("ctx.term()", "auth.stop()\nctx.term()")
    return head + client_lines + tail


def test_the_documented_curve_senders_get_their_scans_in_binding_and_connecting(keys, tmp_path):
    good, _, _ = keys
    for binds in (True, False):
        (tmp_path / f"sender-{binds}.py").write_text(documented_curve_sender(binds))
    bridge = f"ipc://{tmp_path}/bridge"
    # the sender binds, as a detector does; serve connects with the keys
    binding = subprocess.Popen([sys.executable, str(tmp_path / "sender-True.py"), bridge, str(good)],
                               stderr=subprocess.PIPE, text=True)
    connecting = None
    try:
        first = Serve("--listen", bridge, "--publish", ANY, "--control", ANY, "--keys", str(good), "--once",
                      "--out", str(tmp_path / "bound.h5"))
        # serve binds; the sender connects with the keys
        second = Serve("--bind", "--listen", f"ipc://{tmp_path}/service", "--publish", ANY, "--control", ANY,
                       "--keys", str(good), "--once", "--out", str(tmp_path / "connected.h5"))
        connecting = subprocess.Popen([sys.executable, str(tmp_path / "sender-False.py"), second.frames, str(good)],
                                      stderr=subprocess.PIPE, text=True)
        for serve, sender in ((first, binding), (second, connecting)):
            code, output = serve.finish(30.0)
            assert code == 0, output
            assert sender.wait(30) == 0, sender.stderr.read()
    finally:
        for proc in (binding, connecting):
            if proc is not None and proc.poll() is None:
                proc.kill()
    for name in ("bound.h5", "connected.h5"):
        res = read_scan(tmp_path / name, "bridge-demo-0001")
        counters = res["attrs"]["counters"]
        # all 256 frames arrived; the stand-in detector's frame 0 is all zeros: a measurement with no counts,
        # filled (VBF 0, no COM), counted as zero_counts, not invalid
        assert (counters["received"], counters["invalid"], counters["missing"]) == (256, 0, 0), (name, counters)
        assert res["attrs"]["invalid_reasons"] == {} and res["attrs"]["zero_counts"] == 1
        assert res["attrs"]["complete"] and res["attrs"]["end_reason"] == "end"
        assert res["maps"]["vbf"][0, 0] == 0 and np.isnan(res["maps"]["com_x"][0, 0])


def test_a_client_key_put_in_authorized_while_the_service_runs_is_let_in(keys, tmp_path):
    good, _, _ = keys
    newcomer = tmp_path / "newcomer"
    newcomer.mkdir()
    public, secret = zmq.auth.create_certificates(newcomer, "client")
    shutil.copy(good / "server.key", newcomer)
    cfg = ServiceConfig(listen=ANY, bind=True, publish=None, control=ANY, out=None, train=False, keys=good)
    with Service(cfg) as svc:
        with ControlClient(svc.control_endpoint, timeout=0.5, keys=newcomer) as ctl, pytest.raises(ControlTimeout):
            ctl.request("status")  # not authorized yet
        assert svc.curve.refused >= 1
        shutil.copy(public, good / "authorized" / "newcomer.key")
        time.sleep(1.0)  # the folder is read again at most once a second
        with ControlClient(svc.control_endpoint, timeout=5.0, keys=newcomer) as ctl:
            assert ctl.request("status")["status"]["scan_id"] is None
        with ControlClient(svc.control_endpoint, timeout=5.0, keys=good) as ctl:  # the first client still works
            assert ctl.request("status")["status"]["scan_id"] is None
