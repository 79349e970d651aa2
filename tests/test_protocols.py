"""The one table of detector protocols (``stream.detectors.PROTOCOLS``) agrees with everything that reads it."""

from __future__ import annotations

import argparse
import queue
import threading

import pytest
import zmq

from rrstem.simulators.cli import add_replay_args, add_simulate_args
from rrstem.simulators.senders import SENDERS, SPECIFIC, Sender, send_args
from rrstem.stream.cli import add_serve_args
from rrstem.stream.detectors import PROTOCOLS, Framing, Protocol, decoder_for, lookup
from rrstem.stream.detectors.rrstem import RrstemDecoder
from rrstem.stream.receiver import Receiver, TcpReceiver, make_receiver


def serve_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(prog="rrstem")
    return p, add_serve_args(p.add_subparsers(dest="command"))


def test_every_protocol_is_a_serve_choice_and_nothing_else_is():
    p, serve = serve_parser()
    for name in PROTOCOLS:
        assert p.parse_args(["serve", "--protocol", name]).protocol == name
    assert p.parse_args(["serve"]).protocol == "rrstem" == next(iter(PROTOCOLS))
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--protocol", "nonesuch"])
    text = " ".join(serve.format_help().split())
    for name, spec in PROTOCOLS.items():
        assert f"{name}: {spec.description}" in text


def test_every_entry_is_consistent():
    assert list(PROTOCOLS) == ["rrstem", "simplon", "stream2", "merlin"]
    for name, spec in PROTOCOLS.items():
        assert isinstance(spec, Protocol) and spec.name == name and spec.description
        assert "\n" not in spec.description
        assert spec.transport in ("zmq", "tcp")
        if spec.transport == "tcp":  # a TCP protocol has its framing; ZeroMQ keeps messages whole
            assert spec.framing is not None and issubclass(spec.framing, Framing)
            assert spec.framing.name and spec.framing.marker
        else:
            assert spec.framing is None
        assert spec.make_decoder((4, 5), 0, 0) is not None
        if spec.needs_scan_shape:  # the flag says what the decoder does
            with pytest.raises(ValueError, match="--scan-shape"):
                spec.make_decoder(None)
        else:
            assert spec.make_decoder(None) is not None
    assert [n for n, s in PROTOCOLS.items() if s.curve] == ["rrstem"]  # only rrstem/1 speaks CURVE
    assert [n for n, s in PROTOCOLS.items() if s.transport == "tcp"] == ["merlin"]


def test_a_descriptor_refuses_a_transport_without_its_framing():
    with pytest.raises(ValueError, match="framing"):
        Protocol("x", "x", lambda *a: RrstemDecoder(), transport="tcp")
    with pytest.raises(ValueError, match="framing"):
        Protocol("x", "x", lambda *a: RrstemDecoder(), framing=Framing)
    with pytest.raises(ValueError, match="transport"):
        Protocol("x", "x", lambda *a: RrstemDecoder(), transport="udp")


def test_the_decoder_is_given_what_it_takes():
    merlin = decoder_for("merlin", (4, 5), sync_offset=3, flyback=2)
    assert (merlin.scan_shape, merlin.sync_offset, merlin.flyback) == ((4, 5), 3, 2)
    assert decoder_for("stream2", (4, 5)).scan_shape == (4, 5)
    assert isinstance(decoder_for("rrstem", None), RrstemDecoder)
    for bad in (lambda: lookup("nonesuch"), lambda: decoder_for("nonesuch", None)):
        with pytest.raises(ValueError, match="unknown detector protocol 'nonesuch'; choose one of: rrstem, simplon"):
            bad()


def test_make_receiver_picks_the_transport_and_framing_from_the_table():
    ctx, out, stop = zmq.Context.instance(), queue.Queue(4), threading.Event()
    tcp = make_receiver("merlin", ctx, "tcp://127.0.0.1:6342", out, stop, decoder_for("merlin", None))
    assert isinstance(tcp, TcpReceiver) and isinstance(tcp.framing, PROTOCOLS["merlin"].framing)
    with pytest.raises(ValueError, match="rrstem connects to it: drop --bind and --sub"):
        make_receiver("merlin", ctx, "tcp://127.0.0.1:6342", out, stop, decoder_for("merlin", None), mode="sub")
    zmq_receiver = make_receiver("rrstem", ctx, "tcp://127.0.0.1:0", out, stop, decoder_for("rrstem", None), bind=True)
    try:
        assert isinstance(zmq_receiver, Receiver) and zmq_receiver.endpoint.startswith("tcp://127.0.0.1:")
    finally:
        zmq_receiver.sock.close(linger=0)


@pytest.mark.parametrize("add, argv", [(add_simulate_args, ["simulate"]), (add_replay_args, ["replay", "x.npy"])])
def test_every_protocol_is_a_simulate_and_replay_choice_with_a_sender(add, argv):
    p = argparse.ArgumentParser(prog="rrstem")
    command = add(p.add_subparsers(dest="command"))
    base = [*argv, "--to", "tcp://127.0.0.1:0"]
    for name in PROTOCOLS:
        assert p.parse_args([*base, "--protocol", name]).protocol == name
    assert p.parse_args(base).protocol == "rrstem"
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--protocol", "nonesuch"])
    text = " ".join(command.format_help().split())
    for name, spec in PROTOCOLS.items():
        assert f"{name}: {spec.description}" in text
    assert set(SENDERS) == set(PROTOCOLS)  # every protocol has its sender, and no sender is left over
    for name, sender in SENDERS.items():
        assert isinstance(sender, Sender) and callable(sender.send) and set(sender.options) <= set(SPECIFIC)
        defaults = p.parse_args([*base, "--protocol", name])
        for dest, (flag, default) in SPECIFIC.items():  # each option's flag and default are the parser's
            assert getattr(defaults, dest) == default and flag.lstrip("-").replace("-", "_") == dest


def test_options_a_protocol_does_not_take_are_refused_by_the_table():
    p = argparse.ArgumentParser(prog="rrstem")
    add_simulate_args(p.add_subparsers(dest="command"))

    def refused(*extra) -> str:
        args = p.parse_args(["simulate", "--to", "tcp://127.0.0.1:0", *extra])
        with pytest.raises(ValueError) as exc:
            send_args(None, args, None, print)  # refused before anything is sent
        return str(exc.value)

    assert refused("--compression", "lz4") == "--compression applies to --protocol simplon or stream2, not rrstem"
    assert refused("--protocol", "merlin", "--compression", "lz4", "--connect").startswith(
        "--compression applies to --protocol simplon or stream2, not merlin")
    assert refused("--protocol", "stream2", "--layout", "2x2", "--flyback", "2") == (
        "--layout applies to --protocol merlin; --flyback applies to --protocol merlin, not stream2")
    assert refused("--protocol", "merlin", "--pub") == (
        "the merlin detector serves its data port over plain TCP: rrstem serve --protocol merlin connects to it; "
        "drop --connect and --pub")
    for name in ("simplon", "merlin"):
        assert refused("--protocol", name, "--keys", "/nonexistent") == (
            f"--keys applies to --protocol rrstem: {name} has no CURVE, as the detectors that speak it have none")
