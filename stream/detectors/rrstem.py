"""The native ``rrstem/1`` protocol (``stream/protocol.py``): headers validated, frame buffers size-checked."""

from __future__ import annotations

from typing import Any

from rrstem.stream.detectors.base import Item
from rrstem.stream.protocol import End, ProtocolError, Start, decode_header, frames_array


class RrstemDecoder:
    """``rrstem/1``: frame buffers are checked against their scan's start and viewed without copying."""

    def __init__(self):
        self._starts: dict[str, Start] = {}

    def decode(self, parts: list[Any]) -> Item:
        try:
            msg = decode_header(parts[0].buffer)
        except ProtocolError as exc:
            return Item("bad", reason="undecodable", detail=str(exc))
        if isinstance(msg, Start):
            if len(parts) != 1:
                return Item("bad", reason="extra_part", detail=f"start message has {len(parts)} parts, expected 1",
                            scan_id=msg.scan_id)
            self._starts[msg.scan_id] = msg
            if len(self._starts) > 64:  # keep only recent scans for validation
                self._starts.pop(next(iter(self._starts)))
            return Item("start", msg, scan_id=msg.scan_id)
        if isinstance(msg, End):
            if len(parts) != 1:
                return Item("bad", reason="extra_part", detail=f"end message has {len(parts)} parts, expected 1",
                            scan_id=msg.scan_id)
            return Item("end", msg, scan_id=msg.scan_id)
        if len(parts) != 2:
            return Item("bad", reason="missing_part" if len(parts) < 2 else "extra_part",
                        detail=f"frames message has {len(parts)} parts, expected 2 (header, buffer)",
                        scan_id=msg.scan_id, count=msg.count)
        start = self._starts.get(msg.scan_id)
        if start is None:
            return Item("bad", reason="no_start", detail=f"frames for scan {msg.scan_id!r} before its start message",
                        scan_id=msg.scan_id, count=msg.count)
        try:
            frames = frames_array(start, msg, parts[1].buffer)
        except ProtocolError as exc:
            return Item("bad", reason="bad_size", detail=str(exc), scan_id=msg.scan_id, count=msg.count)
        return Item("frames", msg, frames=frames, scan_id=msg.scan_id, count=msg.count)
