"""The one table of detector protocols (``stream.detectors.PROTOCOLS``) agrees with everything that reads it."""

from __future__ import annotations

import argparse
import queue
import threading

import pytest
import zmq

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
