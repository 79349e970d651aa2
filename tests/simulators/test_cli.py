"""``rrstem simulate`` / ``rrstem replay`` subcommands, parsed and run against a real PULL socket.

Their scan shapes go through the one parser, ``rrstem.stream.cli.parse_scan_shape``: tests/stream/test_cli.py.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import zmq

from rrstem.simulators.cli import add_replay_args, add_simulate_args
from rrstem.simulators.graphene import GrapheneSource


@pytest.fixture
def parser():
    p = argparse.ArgumentParser(prog="rrstem")
    sub = p.add_subparsers(dest="command", required=True)
    add_simulate_args(sub)
    add_replay_args(sub)
    return p


@pytest.fixture
def pull(zctx):
    sock = zctx.socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def test_simulate_defaults_match_the_design(parser):
    args = parser.parse_args(["simulate", "--to", "tcp://127.0.0.1:5555"])
    assert (args.scan, args.detector, args.dose, args.defect, args.rate) == ((64, 64), 128, 3e6, "none", None)
    assert (args.connect, args.pub, args.seed, args.step_nm) == (False, False, 0, 0.02)
    assert args.func.__name__ == "run_simulate"
    args = parser.parse_args(["simulate", "--scan", "32x48", "--dose", "none", "--defect", "si",
                              "--to", "ipc:///tmp/x", "--rate", "500", "--pub", "--connect"])
    assert (args.scan, args.dose, args.defect, args.rate, args.pub, args.connect) == ((32, 48), None, "si", 500.0,
                                                                                   True, True)


@pytest.mark.parametrize("argv", [["simulate", "--scan", "0x4", "--to", "x"], ["simulate", "--scan", "axb", "--to", "x"],
                                  ["simulate", "--dose", "-3", "--to", "x"], ["simulate", "--defect", "b", "--to", "x"],
                                  ["simulate"], ["replay", "--to", "x"]])
def test_bad_command_lines_are_refused(parser, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == 2 and "error" in capsys.readouterr().err


def test_simulate_streams_the_scan(parser, pull, run_in_thread, receive, capsys):
    sock, endpoint = pull
    args = parser.parse_args(["simulate", "--scan", "4x6", "--detector", "64", "--dose", "none", "--to", endpoint,
                              "--connect", "--no-progress", "--scan-id", "cli-sim"])
    join = run_in_thread(args.func, args)
    got = receive(sock)
    assert join() == 0
    expected = GrapheneSource((4, 6), 64).chunk(0, 24)
    assert got["start"].scan_id == "cli-sim" and got["end"].frames_sent == 24
    assert all(np.array_equal(got["frames"][i][0], expected[i]) for i in range(24))
    assert "sent 24 frames" in capsys.readouterr().err


def test_replay_streams_a_file_with_its_key(parser, pull, run_in_thread, receive, tmp_path):
    sock, endpoint = pull
    data = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    np.savez(tmp_path / "rec.npz", a=data, b=data[:1])
    args = parser.parse_args(["replay", str(tmp_path / "rec.npz"), "--key", "a", "--to", endpoint,
                              "--connect", "--no-progress"])
    join = run_in_thread(args.func, args)
    got = receive(sock)
    assert join() == 0
    assert got["start"].dtype == "float32" and got["start"].scan_id == "rec-a"
    assert np.array_equal(np.stack([got["frames"][i][0] for i in range(6)]), data.reshape(6, 4, 5))


def test_replay_of_a_bad_file_reports_the_reason(parser, capsys, tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((3, 4)))
    args = parser.parse_args(["replay", str(tmp_path / "flat.npy"), "--to", "tcp://127.0.0.1:0", "--no-progress"])
    assert args.func(args) == 1
    assert "not 4D" in capsys.readouterr().err


def test_simulate_without_receiver_times_out_cleanly(parser, capsys):
    args = parser.parse_args(["simulate", "--scan", "2x2", "--detector", "64", "--to", "tcp://127.0.0.1:0",
                              "--timeout", "0.2", "--no-progress"])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "bound tcp://127.0.0.1:" in err and "no receiver took frames" in err
