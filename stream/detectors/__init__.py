"""Detector protocols: each turns its wire messages into the service's internal items.

One module per protocol, and the table of them below (``PROTOCOLS``):

- ``base.py``: ``Item``, the ``Decoder`` interface, ``BadMessage``,
  ``DetectorDecoder`` (the series bookkeeping of detector protocols) and
  ``Framing`` (how a TCP byte stream is cut into messages);
- ``rrstem.py``: the native ``rrstem/1`` (``stream/protocol.py``);
- ``dectris.py``: DECTRIS SIMPLON stream v1 (``simplon``); ``stream2.py``: DECTRIS stream2 (CBOR);
- ``merlin.py``: Quantum Detectors Merlin (``MPX`` messages over plain TCP:
  ``MpxFraming``, read by ``stream.receiver.TcpReceiver``);
- ``codecs.py``: LZ4 and bitshuffle+LZ4 in the HDF5 filters' framing.

A decoder has ``decode(parts) -> Item | list[Item]`` and never raises on bad
input: it emits a ``start`` item when a scan (a detector series) begins,
``frames`` items and an ``end`` item, exactly like ``rrstem/1``; rejected
messages become ``bad`` items with a reason, counted like any other bad input.
Detector protocols do not carry the scan shape; their decoder is given it
(``rrstem serve --scan-shape``).

``PROTOCOLS`` is the one table of protocols: ``rrstem serve --protocol``
takes its names and help from it, the service builds the decoder and picks
the receiver from it (``stream.receiver.make_receiver``), and
``rrstem simulate``/``replay --protocol`` offer the same names, each sent by
the sender ``simulators/senders.py`` keeps under the name (a test checks
that every protocol has one).

To add a protocol:

1. Write ``stream/detectors/<name>.py`` with a decoder class. For a detector
   that streams series, subclass ``DetectorDecoder``: implement ``_decode``,
   call ``_begin`` on a header, ``_image`` per image and ``_end`` at the end,
   and raise ``BadMessage(reason, detail)`` for anything malformed. Over plain
   TCP, add a ``Framing`` subclass too (``merlin.py``'s ``MpxFraming``).
2. Add its ``Protocol`` to ``PROTOCOLS`` below: the name is then a choice of
   ``rrstem serve``, ``simulate`` and ``replay --protocol``.
3. Write its sender in ``simulators/<name>.py`` and register it in
   ``SENDERS`` (``simulators/senders.py``), with the protocol's own options;
   test it over real sockets (``tests/stream/``) and describe the mapping in
   ``docs/protocol.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rrstem.stream.detectors.base import BadMessage, Decoder, Framing, Item
from rrstem.stream.detectors.dectris import SimplonDecoder
from rrstem.stream.detectors.stream2 import Stream2Decoder
from rrstem.stream.detectors.merlin import MerlinDecoder, MpxFraming
from rrstem.stream.detectors.rrstem import RrstemDecoder

__all__ = ["BadMessage", "Decoder", "Framing", "Item", "PROTOCOLS", "Protocol", "decoder_for", "lookup"]

#: factory(scan_shape or None, sync_offset, flyback) -> Decoder
DecoderFactory = Callable[[tuple[int, int] | None, int, int], Decoder]


@dataclass(frozen=True)
class Protocol:
    """One detector protocol: what the command lines offer, and how the service receives and decodes it."""

    name: str  # the --protocol choice
    description: str  # one line for --help
    decoder: DecoderFactory
    transport: str = "zmq"  # "zmq": a ZeroMQ socket (stream.receiver.Receiver); "tcp": plain TCP (TcpReceiver)
    framing: type[Framing] | None = None  # tcp: cuts the byte stream into messages
    needs_scan_shape: bool = False  # the wire does not carry the scan shape: serve needs --scan-shape
    curve: bool = False  # the sender can speak CURVE (--keys); detector firmware cannot

    def __post_init__(self):
        if self.transport not in ("zmq", "tcp"):
            raise ValueError(f"protocol {self.name}: transport must be 'zmq' or 'tcp', not {self.transport!r}")
        if (self.transport == "tcp") != (self.framing is not None):
            raise ValueError(f"protocol {self.name}: a framing is needed over tcp, and only there")

    def make_decoder(self, scan_shape: tuple[int, int] | None, sync_offset: int = 0, flyback: int = 0) -> Decoder:
        return self.decoder(scan_shape, sync_offset, flyback)


def _given_scan_shape(cls) -> DecoderFactory:
    """The factory of a decoder that takes the scan shape alone (sync offset and flyback are the service's)."""
    return lambda scan_shape, sync_offset=0, flyback=0: cls(scan_shape)


#: Every protocol, by name; the first is the default.
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("rrstem", "rrstem/1, rrstem's own, the only one with CURVE (--keys)",
             lambda scan_shape, sync_offset=0, flyback=0: RrstemDecoder(), curve=True),
    Protocol("simplon", "a DECTRIS detector's SIMPLON stream v1 (\"legacy\"), one image per message",
             _given_scan_shape(SimplonDecoder), needs_scan_shape=True),
    Protocol("stream2", "a DECTRIS detector's SIMPLON stream2 (CBOR), one image per message",
             _given_scan_shape(Stream2Decoder), needs_scan_shape=True),
    Protocol("merlin", "a Quantum Detectors Merlin PC's data port, MPX messages over plain TCP, the scan shape "
             "from its header's ScanX/ScanY or --scan-shape",
             MerlinDecoder, transport="tcp", framing=MpxFraming),
)}


def lookup(name: str) -> Protocol:
    """The protocol called ``name``; a clear error names the choices."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown detector protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}") from None


def decoder_for(protocol: str, scan_shape: tuple[int, int] | None, sync_offset: int = 0,
                flyback: int = 0) -> Decoder:
    """The decoder for ``protocol``; a clear error names the choices."""
    return lookup(protocol).make_decoder(scan_shape, sync_offset, flyback)
