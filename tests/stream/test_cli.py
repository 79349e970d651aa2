"""The command line: the one parser, its scan shapes, and runs as a user would (real processes, sockets, files)."""

import argparse
import io
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from support import disc_frames, reference
from rrstem.cli import build_parser, main
from rrstem.stream.cli import parse_scan_shape, run_service
from rrstem.stream.results import read_scan

RRSTEM = [sys.executable, "-m", "rrstem.cli"]
COMMANDS = ("demo", "serve", "simulate", "replay", "analyze", "dashboard", "keys", "events", "rescan", "export")
SHAPE_ERROR = "scan shape must be NYxNX or N (a square scan) in positive integers, such as 64x48 or 64; got "


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("text, shape", [("64", (64, 64)), ("64x48", (64, 48)), ("8X8", (8, 8)), (" 1x3 ", (1, 3))])
def test_scan_shapes_are_n_or_ny_x_nx(text, shape):
    assert parse_scan_shape(text) == shape


@pytest.mark.parametrize("text", ["0x4", "ax4", "4x4x4", "4x0", "0", "-4", "64x", "x", "", "4.5x4", "²"])
def test_bad_scan_shapes_are_refused_with_one_message(text):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(SHAPE_ERROR + repr(text))):
        parse_scan_shape(text)


def test_every_scan_shape_option_uses_the_one_parser():
    found = {}
    for name, sub in subcommands(build_parser()).items():
        for action in sub._actions:
            if any(opt.startswith("--scan") and opt not in ("--scan-id", "--scan-rotation") for opt in action.option_strings):
                found[(name, action.option_strings[0])] = action.type
    assert set(found) == {("serve", "--scan-shape"), ("demo", "--scan"), ("simulate", "--scan"),
                          ("replay", "--scan-shape"), ("analyze", "--scan-shape")}
    assert all(parse is parse_scan_shape for parse in found.values())


@pytest.mark.parametrize("argv, dest", [(["serve", "--scan-shape"], "scan_shape"), (["demo", "--scan"], "scan"),
                                        (["simulate", "--to", "ipc:///x", "--scan"], "scan"),
                                        (["replay", "f.h5", "--to", "ipc:///x", "--scan-shape"], "scan_shape"),
                                        (["analyze", "f.h5", "--scan-shape"], "scan_shape")])
def test_64_and_64x48_work_everywhere(argv, dest, capsys):
    parser = build_parser()
    assert getattr(parser.parse_args(argv + ["64"]), dest) == (64, 64)
    assert getattr(parser.parse_args(argv + ["64x48"]), dest) == (64, 48)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv + ["4x4x4"])
    assert exc.value.code == 2
    assert SHAPE_ERROR + "'4x4x4'" in capsys.readouterr().err


def test_rrstem_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rrstem")
    assert tuple(subcommands(build_parser())) == COMMANDS
    assert all(re.search(rf"^\s+{name}\s", out, re.M) for name in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: rrstem {command}")


def test_serve_defaults_are_the_documented_ones():
    args = build_parser().parse_args(["serve"])
    assert (args.listen, args.bind, args.publish, args.control) == ("tcp://127.0.0.1:5555", False,
                                                                   "tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557")
    assert (str(args.out), args.bin, args.scan_shape, args.once, args.protocol) == ("rrstem-results.h5", 1, None,
                                                                                   False, "rrstem")
    assert (args.events, args.steering, args.steer_timeout) == ("tcp://127.0.0.1:5558", "tcp://127.0.0.1:5559", 30.0)


def test_progress_follows_the_service_header(make_service, sender_for, monkeypatch, capsys):
    """run_service draws the scan's bar from Service.header(), prints the results and closes the service."""
    svc = make_service()
    frames = disc_frames(3, 4, seed=13)
    tx = sender_for(svc)
    tx.start("bar", (3, 4), (32, 32))
    tx.frames("bar", 0, frames.reshape(12, 32, 32))
    tx.end("bar", 12)
    deadline = time.monotonic() + 20
    while svc.header().state != "done":
        assert time.monotonic() < deadline, f"scan not done: {svc.header()}"
        time.sleep(0.05)
    bars = io.StringIO()  # tqdm writes here from the runner thread; read without truncating, nothing is lost
    monkeypatch.setattr(sys, "stderr", bars)
    box = {}
    runner = threading.Thread(target=lambda: box.setdefault("code", run_service(svc)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 20
    while "12/12" not in bars.getvalue():  # tqdm's received/expected, from header().counters and .expected
        assert time.monotonic() < deadline, f"no full bar in {bars.getvalue()!r}"
        time.sleep(0.05)
    svc.stop()
    runner.join(20)
    assert box["code"] == 0
    assert bars.getvalue().startswith("\rbar: ")  # the bar is named by header().scan_id
    assert "results of scan bar: " in capsys.readouterr().out


def test_analyze_writes_the_maps_of_the_file(tmp_path):
    frames = disc_frames(5, 6, seed=11)
    np.save(tmp_path / "scan.npy", frames)
    out = tmp_path / "scan.h5"
    run = subprocess.run([*RRSTEM, "analyze", str(tmp_path / "scan.npy"), "--bin", "2", "--no-train",
                          "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    res = read_scan(out)
    ref = reference(frames, res["attrs"]["geometry"])
    np.testing.assert_array_equal(res["maps"]["vbf"], ref["vbf"])
    np.testing.assert_allclose(res["maps"]["com_x"], ref["com_x"], atol=1e-9)
    assert res["attrs"]["counters"]["received"] == 30


def test_analyze_explains_a_bad_input(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.uint16))
    run = subprocess.run([*RRSTEM, "analyze", str(tmp_path / "flat.npy"), "--no-train"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert "4D" in run.stderr and "Traceback" not in run.stderr


def test_serve_once_takes_a_replayed_scan(tmp_path):
    frames = disc_frames(4, 4, seed=12)
    np.save(tmp_path / "scan.npy", frames)
    out = tmp_path / "served.h5"
    serve = subprocess.Popen([*RRSTEM, "serve", "--bind", "--listen", "tcp://127.0.0.1:0", "--publish",
                              "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--once", "--no-train",
                              "--no-progress", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        line = serve.stdout.readline()
        endpoint = re.search(r"frames from (tcp://\S+?),", line).group(1)
        replay = subprocess.run([*RRSTEM, "replay", str(tmp_path / "scan.npy"), "--to", endpoint, "--connect",
                                 "--no-progress"], capture_output=True, text=True, timeout=60)
        assert replay.returncode == 0, replay.stderr
        assert serve.wait(60) == 0, serve.stderr.read()
    finally:
        serve.kill()
    res = read_scan(out)
    assert res["attrs"]["counters"]["received"] == 16
    np.testing.assert_array_equal(res["maps"]["vbf"], reference(frames, res["attrs"]["geometry"])["vbf"])


def test_no_warm_start_turns_the_trainers_warm_start_off():
    from rrstem.cli import build_parser
    from rrstem.model.config import TrainerConfig
    from rrstem.stream.cli import trainer_overrides

    assert TrainerConfig().warm_start is True  # on by default
    for command in ("serve", "demo"):
        args = build_parser().parse_args([command, "--no-warm-start"])
        assert trainer_overrides(args) == {"warm_start": False}
        assert TrainerConfig.from_dict(trainer_overrides(args)).warm_start is False
    assert "warm_start" not in trainer_overrides(build_parser().parse_args(["serve"]))
