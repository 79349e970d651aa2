"""Detector protocols: each turns its wire messages into the service's internal items.

``rrstem`` is the native protocol (``stream/protocol.py``). A detector adapter
is a decoder class with ``decode(parts) -> Item | list[Item]``; it emits a
``start`` item when a detector series begins (taking the scan shape from
``--scan-shape``, which detector protocols do not carry), ``frames`` items,
and an ``end`` item, exactly like ``rrstem/1``. Rejected messages become
``bad`` items with a reason, and are counted like any other bad input.
"""

from __future__ import annotations

from typing import Callable

from rrstem.stream.dectris import SimplonDecoder, Stream2Decoder
from rrstem.stream.receiver import Decoder, RrstemDecoder

#: protocol name -> factory(scan_shape or None) -> Decoder
DECODERS: dict[str, Callable[[tuple[int, int] | None], Decoder]] = {
    "rrstem": lambda scan_shape: RrstemDecoder(),
    "simplon": SimplonDecoder,  # DECTRIS SIMPLON stream v1 ("legacy"), stream/dectris.py
    "stream2": Stream2Decoder,  # DECTRIS SIMPLON stream2 (CBOR), stream/dectris.py
}


def decoder_for(protocol: str, scan_shape: tuple[int, int] | None) -> Decoder:
    """The decoder for ``protocol``; a clear error names the choices."""
    try:
        factory = DECODERS[protocol]
    except KeyError:
        raise ValueError(f"unknown detector protocol {protocol!r}; choose one of: {', '.join(DECODERS)}") from None
    return factory(scan_shape)
