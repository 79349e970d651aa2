"""Detector protocols: each turns its wire messages into the service's internal items.

One module per protocol, and the registry below:

- ``base.py``: ``Item``, the ``Decoder`` interface, ``BadMessage``, and
  ``DetectorDecoder``, the series bookkeeping of detector protocols;
- ``rrstem.py``: the native ``rrstem/1`` (``stream/protocol.py``);
- ``dectris.py``: DECTRIS SIMPLON stream v1 (``simplon``) and stream2;
- ``merlin.py``: Quantum Detectors Merlin (``MPX`` messages over plain TCP,
  read by ``stream.receiver.TcpReceiver``);
- ``codecs.py``: LZ4 and bitshuffle+LZ4 in the HDF5 filters' framing.

A decoder has ``decode(parts) -> Item | list[Item]`` and never raises on bad
input: it emits a ``start`` item when a scan (a detector series) begins,
``frames`` items and an ``end`` item, exactly like ``rrstem/1``; rejected
messages become ``bad`` items with a reason, counted like any other bad input.
Detector protocols do not carry the scan shape; their decoder is given it
(``rrstem serve --scan-shape``).

To add a protocol:

1. Write ``stream/detectors/<name>.py`` with a decoder class. For a detector
   that streams series, subclass ``DetectorDecoder``: implement ``_decode``,
   call ``_begin`` on a header, ``_image`` per image and ``_end`` at the end,
   and raise ``BadMessage(reason, detail)`` for anything malformed.
2. Register ``"<name>": factory(scan_shape) -> decoder`` in ``DECODERS``;
   the name is then a choice of ``rrstem serve --protocol``.
3. Test it over real sockets against a sender in ``simulators/<name>.py``
   (``tests/stream/``) and describe the mapping in ``docs/protocol.md``.
"""

from __future__ import annotations

from typing import Callable

from rrstem.stream.detectors.base import BadMessage, Decoder, Item
from rrstem.stream.detectors.dectris import SimplonDecoder, Stream2Decoder
from rrstem.stream.detectors.merlin import MerlinDecoder
from rrstem.stream.detectors.rrstem import RrstemDecoder

__all__ = ["BadMessage", "DECODERS", "Decoder", "Item", "TCP_PROTOCOLS", "decoder_for"]

#: protocol name -> factory(scan_shape or None) -> Decoder
DECODERS: dict[str, Callable[[tuple[int, int] | None], Decoder]] = {
    "rrstem": lambda scan_shape: RrstemDecoder(),  # rrstem/1, rrstem.py
    "simplon": SimplonDecoder,  # DECTRIS SIMPLON stream v1 ("legacy"), dectris.py
    "stream2": Stream2Decoder,  # DECTRIS SIMPLON stream2 (CBOR), dectris.py
    "merlin": MerlinDecoder,  # Quantum Detectors Merlin over TCP, merlin.py
}

#: Protocols over plain TCP (``stream.receiver.TcpReceiver``) rather than ZeroMQ.
TCP_PROTOCOLS = ("merlin",)
#: Protocols whose decoder needs the sync offset and flyback (to know where a scan ends).
_ACQUISITION_OPTIONS = ("merlin",)


def decoder_for(protocol: str, scan_shape: tuple[int, int] | None, sync_offset: int = 0,
                flyback: int = 0) -> Decoder:
    """The decoder for ``protocol``; a clear error names the choices."""
    try:
        factory = DECODERS[protocol]
    except KeyError:
        raise ValueError(f"unknown detector protocol {protocol!r}; choose one of: {', '.join(DECODERS)}") from None
    if protocol in _ACQUISITION_OPTIONS:
        return factory(scan_shape, sync_offset=sync_offset, flyback=flyback)
    return factory(scan_shape)
