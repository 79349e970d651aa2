"""Control socket: msgpack request/reply over ZeroMQ REQ/REP.

A request is a msgpack map ``{"cmd": NAME, ...arguments}``; the reply is a
msgpack map with ``ok`` (bool), ``error`` (str, when not ok) and the command's
fields. Arrays in replies are maps ``{"dtype", "shape", "data"}`` (see
``pack_array``). Commands:

``status``           -> ``status``: the current snapshot header fields (counters, state, ...)
``save`` [``path``]  -> ``path``: results file written now (``path``: write there from now on)
``stop``             -> the service shuts down after replying
``pause_training``   -> ``training``: trainer status
``resume_training``  -> ``training``
``reset_model``      -> ``training``: re-initialises the rrVAE weights
``frame`` ``index=[y, x]`` -> ``frame`` (binned frame), ``mean`` (mean pattern),
                      ``recon`` and ``residual`` (mean-subtracted frame minus
                      the model's reconstruction; absent without a model)

A service started with ``--read-only-control`` refuses the commands that
change its state (``changes_state``: stop, the training commands, save with
a path) with ``ok: false``, ``read_only: true`` and an error that starts
``control is read-only:``; status, frame and save without a path still work.
With ``keys`` (``stream/auth.py``), ``ControlClient`` talks CURVE.
``rescan`` ``region=[y0, y1, x0, x1]`` [``step_factor``, ``dwell_factor``, ``dose_factor``, ``scan_id``]
                     -> ``request``: the rescan request published for the bridge
                      (``stream/steering.py``; a bad request gets ``ok: false`` and nothing is sent)
``rescan_answer`` ``request_id``, ``accepted`` [``reason``] -> ``request_id``, ``state``:
                      a bridge's answer to a rescan request
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import msgpack
import numpy as np
import zmq

from rrstem.stream.auth import Curve, curve_for

COMMANDS = ("status", "save", "stop", "pause_training", "resume_training", "reset_model", "frame",
            "rescan", "rescan_answer")
#: commands that change the service's state, refused by a read-only control socket (and ``save`` with a path)
CHANGING = ("stop", "pause_training", "resume_training", "reset_model", "rescan")


def changes_state(req: dict[str, Any]) -> bool:
    """Whether request ``req`` would change the service: a ``CHANGING`` command, or ``save`` to another path."""
    cmd = req.get("cmd")
    return cmd in CHANGING or (cmd == "save" and req.get("path") is not None)


class ControlAPI(Protocol):
    """What the control socket can ask of the service: one method per command."""

    def header(self):
        """The current snapshot header (a ``SnapshotHeader``)."""

    def save(self, path: str | None = None) -> Path:
        """Write the current scan's results now (to ``path``, and every scan after, if given); returns the path."""

    def stop(self) -> None:
        """Shut the service down."""

    def frame_reply(self, index: Any) -> dict[str, Any]:
        """The ``frame`` reply for position ``index`` = [y, x], arrays packed."""

    def pause_training(self) -> dict[str, Any]:
        """The trainer's status after pausing."""

    def resume_training(self) -> dict[str, Any]:
        """The trainer's status after resuming."""

    def reset_model(self) -> dict[str, Any]:
        """The trainer's status after re-initialising the model."""

    def rescan(self, region: Any, step_factor: float = 1.0, dwell_factor: float = 1.0, dose_factor: float = 1.0,
               scan_id: str | None = None) -> dict[str, Any]:
        """Validate a rescan request and publish it for the bridge; returns the request."""

    def rescan_answer(self, request_id: Any, accepted: Any, reason: Any = None) -> dict[str, Any]:
        """Record a bridge's answer to a rescan request."""


def handle(api: ControlAPI, raw: bytes, read_only: bool = False) -> dict[str, Any]:
    """The reply map to one request; a failing command becomes ``ok: false`` with its error, never an exception.

    ``read_only``: a request that ``changes_state`` is refused, and nothing is done.
    """
    try:
        req = unpack(raw)
        cmd = req.get("cmd")
        if cmd not in COMMANDS:
            return {"ok": False, "error": f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}"}
        if read_only and changes_state(req):
            what = "save to another path" if cmd == "save" else repr(cmd)
            return {"ok": False, "read_only": True, "cmd": cmd,
                    "error": f"control is read-only: {what} changes the service, and it was started with "
                             "--read-only-control; status, frame and save (without a path) still work"}
        if cmd == "status":
            out = {"status": api.header().model_dump(mode="json")}
        elif cmd == "save":
            out = {"path": str(api.save(path=req.get("path")))}
        elif cmd == "stop":
            api.stop()
            out = {}
        elif cmd == "frame":
            out = api.frame_reply(req.get("index"))
        elif cmd == "rescan":
            args = {k: req[k] for k in ("step_factor", "dwell_factor", "dose_factor", "scan_id") if k in req}
            out = {"request": api.rescan(req.get("region"), **args)}
        elif cmd == "rescan_answer":
            out = api.rescan_answer(req.get("request_id"), req.get("accepted"), req.get("reason"))
        else:
            out = {"training": getattr(api, cmd)()}
        return {"ok": True, **out}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def pack_array(arr: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(arr)
    return {"dtype": arr.dtype.str.lstrip("<|="), "shape": list(arr.shape), "data": arr.tobytes()}


def unpack_array(obj: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes) -> dict[str, Any]:
    obj = msgpack.unpackb(raw, raw=False)
    if not isinstance(obj, dict):
        raise ValueError("control message is not a msgpack map")
    return obj


class ControlError(RuntimeError):
    """The service answered ``ok: false``, or did not answer (``ControlTimeout``)."""


class ControlTimeout(ControlError):
    """The service did not answer within the timeout."""


class ControlClient:
    """REQ client with a timeout on every request.

    A REQ socket whose request timed out cannot be reused, so it is closed and
    a fresh one is made for the next request ("lazy pirate").
    """

    def __init__(self, endpoint: str, timeout: float = 2.0, context: zmq.Context | None = None,
                 keys: str | Path | Curve | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._curve = curve_for(keys, self._ctx)  # CURVE client: a keys folder (``rrstem keys``), or None
        if self._curve is not None:
            self._curve.ready(server=False)  # a missing keys file is said now, not at the first request
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                self._curve.secure(sock, server=False)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command; return the reply map. Raises ControlError on timeout or ``ok: false``."""
        sock = self._socket()
        sock.send(pack({"cmd": cmd, **args}))
        if not sock.poll(int(self.timeout * 1000)):
            sock.close()
            self._sock = None
            hint = "" if self._curve is not None else " (a service with --keys answers only clients with its keys)"
            raise ControlTimeout(f"no reply from {self.endpoint} within {self.timeout:g} s to {cmd!r}{hint}")
        reply = unpack(sock.recv())
        if not reply.get("ok", False):
            raise ControlError(reply.get("error", f"{cmd!r} failed"))
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
