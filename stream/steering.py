"""Steering: rescan requests, validated here and published for a microscope bridge.

A client asks for a subscan with the control command ``rescan`` (region,
step, dwell and dose factors, optionally the scan id of an earlier scan).
``Steering.request`` checks it against the scans this service has seen and,
if it is sound, publishes a ``RescanRequest`` on the steering socket (a
bound PUB socket, ``serve --steering``, default ``tcp://127.0.0.1:5559``),
one msgpack part under the topic ``rescan``. A bridge (``rrstem simulate
--steer``, or a facility's bridge to its microscope) subscribes there,
answers with the control command ``rescan_answer`` (accepted or refused, and
why), acquires the subscan and streams it back as a new scan with the
request's ``scan_id``. A request that gets neither an answer nor its scan
within ``timeout`` seconds is reported (log, failures, an ``error`` event);
the service goes on. ``docs/steering.md`` documents the protocol.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, get_args

import msgpack
import zmq
from pydantic import BaseModel, ConfigDict, Field

from rrstem.stream.auth import Curve
from rrstem.stream.events import Subscan, bind_pub
from rrstem.stream.protocol import MAX_SCAN_EDGE, Start

log = logging.getLogger("rrstem.steering")

STEER_PROTOCOL = "rrstem-steer/1"
TOPIC = b"rescan"
#: Default steering endpoint of ``rrstem serve``.
DEFAULT_STEERING = "tcp://127.0.0.1:5559"
#: What a factor may be: outside these a request is refused as absurd.
FACTOR_LIMITS = {"step_factor": (1 / 32, 4.0), "dwell_factor": (0.01, 100.0), "dose_factor": (0.01, 100.0)}
#: Most positions a subscan may have.
MAX_POSITIONS = 1 << 22
#: Request states: ``sent`` (published, no answer yet), ``accepted`` (the bridge said yes), ``acquiring``
#: (its scan started), ``refused`` (the bridge said no), ``timed_out`` (no answer within the timeout).
RescanState = Literal["sent", "accepted", "acquiring", "refused", "timed_out"]
STATES: tuple[str, ...] = get_args(RescanState)


class RescanRequest(BaseModel):
    """What the service publishes on the steering socket: one subscan to acquire."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["rescan"] = "rescan"
    protocol: Literal["rrstem-steer/1"] = Field(STEER_PROTOCOL, description="Steering protocol version.")
    request_id: str = Field(description="Unique id of this request; the bridge's answer names it.")
    scan_id: str = Field(description="The scan id the subscan must be sent under (its start message).")
    parent_scan_id: str = Field(description="The scan whose region is rescanned.")
    parent_scan_shape: tuple[int, int] = Field(description="(ny, nx) positions of the parent scan.")
    region: tuple[int, int, int, int] = Field(description="(y0, y1, x0, x1): parent positions y0 <= y < y1, "
                                                          "x0 <= x < x1.")
    scan_shape: tuple[int, int] = Field(description="(ny, nx) positions of the subscan: the region's extent "
                                                    "divided by step_factor, rounded up.")
    step_factor: float = Field(description="Subscan step / parent step (0.5: twice as fine).")
    dwell_factor: float = Field(description="Dwell time per position / the parent's.")
    dose_factor: float = Field(description="Electrons per position / the parent's.")
    parent_step_nm: float | None = Field(None, description="The parent's scan step in nm, if it announced one.")
    step_nm: float | None = Field(None, description="The subscan's step in nm (parent_step_nm * step_factor).")
    parent_dose: float | None = Field(None, description="The parent's electrons per position (its metadata "
                                                        "'dose'), if it announced one.")
    dose: float | None = Field(None, description="The subscan's electrons per position.")
    answer_to: str | None = Field(None, description="The service's control endpoint, for ``rescan_answer``.")
    time: float = Field(default_factory=time.time, description="Unix time the request was published.")

    def encode(self) -> list[bytes]:
        return [TOPIC, msgpack.packb(self.model_dump(mode="json"), use_bin_type=True)]

    @classmethod
    def decode(cls, parts: list) -> "RescanRequest":
        if len(parts) != 2 or bytes(parts[0]) != TOPIC:
            raise ValueError("a rescan request is two parts: b'rescan' and a msgpack map")
        return cls.model_validate(msgpack.unpackb(bytes(parts[1]), raw=False))

    def subscan(self) -> Subscan:
        return Subscan(request_id=self.request_id, parent_scan_id=self.parent_scan_id, region=self.region,
                       step_factor=self.step_factor, dwell_factor=self.dwell_factor, dose_factor=self.dose_factor,
                       step_nm=self.step_nm, dose=self.dose)


@dataclass
class _Known:
    """What a rescan of an earlier scan needs to know about it."""

    scan_shape: tuple[int, int]
    step_nm: float | None
    dose: float | None


@dataclass
class _Pending:
    request: RescanRequest
    deadline: float
    state: str = "sent"
    reason: str | None = None


class Steering:
    """Validates rescan requests, publishes them, follows their answers and times them out (any thread)."""

    def __init__(self, context: zmq.Context, endpoint: str | None, timeout: float = 30.0,
                 curve: "Curve | None" = None):
        self._sock, self.endpoint = bind_pub(context, endpoint, 1000, curve) if endpoint else (None, None)
        self.timeout = timeout
        self.answer_to: str | None = None  # the control endpoint, set by the service
        self._lock = threading.Lock()
        self._known: dict[str, _Known] = {}  # scan id -> shape, step, dose (every scan this service took)
        self._requests: dict[str, _Pending] = {}  # request id -> its state
        self._by_scan: dict[str, str] = {}  # subscan id -> request id
        self._n = 0

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None

    def scan_started(self, start: Start) -> Subscan | None:
        """Remember a scan; if it answers a request, mark that request acquiring and return where it lies."""
        dose = start.metadata.get("dose")
        with self._lock:
            self._known[start.scan_id] = _Known(tuple(start.scan_shape), start.calibration.scan_step_nm,
                                                float(dose) if isinstance(dose, (int, float)) else None)
            rid = self._by_scan.get(start.scan_id)
            if rid is None:
                return None
            pending = self._requests[rid]
            pending.state = "acquiring"
            return pending.request.subscan()

    def subscan_of(self, scan_id: str) -> Subscan | None:
        with self._lock:
            rid = self._by_scan.get(scan_id)
            return self._requests[rid].request.subscan() if rid is not None else None

    def request(self, region: Any, step_factor: float = 1.0, dwell_factor: float = 1.0, dose_factor: float = 1.0,
                scan_id: str | None = None, current: str | None = None) -> RescanRequest:
        """Validate and publish one rescan; raises ``ValueError`` saying what is wrong (nothing is sent then)."""
        if self._sock is None:
            raise ValueError("this service has no steering socket (serve --steering EP): no bridge can take a rescan")
        factors = {"step_factor": step_factor, "dwell_factor": dwell_factor, "dose_factor": dose_factor}
        for name, value in factors.items():
            lo, hi = FACTOR_LIMITS[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}, not {value!r}")
        target = scan_id if scan_id is not None else current
        with self._lock:
            if target is None:
                raise ValueError("no scan yet: nothing to rescan")
            known = self._known.get(target)
            if known is None:
                names = ", ".join(sorted(self._known)[-10:]) or "none"
                raise ValueError(f"no scan {target!r} in this service (scans it knows: {names})")
            y0, y1, x0, x1 = _region(region)
            ny, nx = known.scan_shape
            if y1 <= y0 or x1 <= x0:
                raise ValueError(f"region {y0}:{y1},{x0}:{x1} is empty: give Y0 < Y1 and X0 < X1")
            if y0 < 0 or x0 < 0 or y1 > ny or x1 > nx:
                raise ValueError(f"region {y0}:{y1},{x0}:{x1} is outside scan {target} of {ny}x{nx} positions "
                                 f"(0 <= Y0 < Y1 <= {ny}, 0 <= X0 < X1 <= {nx})")
            shape = (math.ceil((y1 - y0) / step_factor - 1e-9), math.ceil((x1 - x0) / step_factor - 1e-9))
            if max(shape) > MAX_SCAN_EDGE or shape[0] * shape[1] > MAX_POSITIONS:
                raise ValueError(f"the subscan would have {shape[0]}x{shape[1]} positions: too many; use a "
                                 "smaller region or a larger step_factor")
            self._n += 1
            rid = uuid.uuid4().hex[:12]
            sub_id = f"{target[:100]}-sub{self._n}"
            req = RescanRequest(
                request_id=rid, scan_id=sub_id, parent_scan_id=target, parent_scan_shape=(ny, nx),
                region=(y0, y1, x0, x1), scan_shape=shape, step_factor=float(step_factor),
                dwell_factor=float(dwell_factor), dose_factor=float(dose_factor), parent_step_nm=known.step_nm,
                step_nm=known.step_nm * step_factor if known.step_nm else None, parent_dose=known.dose,
                dose=known.dose * dose_factor if known.dose else None, answer_to=self.answer_to)
            self._requests[rid] = _Pending(req, time.monotonic() + self.timeout)
            self._by_scan[sub_id] = rid
            self._sock.send_multipart(req.encode())
        log.info("rescan %s: %s region %d:%d,%d:%d at step x%g, dose x%g -> %s (%dx%d)", rid, target, y0, y1, x0,
                 x1, step_factor, dose_factor, sub_id, *shape)
        return req

    def answer(self, request_id: Any, accepted: Any, reason: Any = None) -> dict[str, Any]:
        """A bridge's answer to a request (control ``rescan_answer``)."""
        with self._lock:
            pending = self._requests.get(request_id) if isinstance(request_id, str) else None
            if pending is None:
                raise ValueError(f"no rescan request {request_id!r}")
            if not isinstance(accepted, bool):
                raise ValueError(f"'accepted' must be true or false, not {accepted!r}")
            if pending.state in ("sent", "timed_out"):
                pending.state = "accepted" if accepted else "refused"
            pending.reason = None if reason is None else str(reason)[:500]
            state = pending.state
        if not accepted:
            log.warning("rescan %s refused by the bridge: %s", request_id, reason)
        return {"request_id": request_id, "state": state}

    def expired(self) -> list[RescanRequest]:
        """Requests whose bridge never answered within the timeout (each returned once, marked timed_out)."""
        now, out = time.monotonic(), []
        with self._lock:
            for pending in self._requests.values():
                if pending.state == "sent" and now > pending.deadline:
                    pending.state = "timed_out"
                    out.append(pending.request)
        return out

    def requests(self, parent: str | None = None) -> list[dict[str, Any]]:
        """Every request (of scan ``parent``, if given) with its region, state and the bridge's reason."""
        with self._lock:
            return [{"request_id": rid, "scan_id": p.request.scan_id, "parent_scan_id": p.request.parent_scan_id,
                     "region": list(p.request.region), "state": p.state, "reason": p.reason}
                    for rid, p in self._requests.items() if parent is None or p.request.parent_scan_id == parent]

    def pending(self) -> int:
        """Requests not yet answered, refused or timed out, nor their scans started."""
        with self._lock:
            return sum(p.state in ("sent", "accepted") for p in self._requests.values())


def _region(region: Any) -> tuple[int, int, int, int]:
    """``[y0, y1, x0, x1]`` or ``"Y0:Y1,X0:X1"`` -> four ints."""
    if isinstance(region, str):
        return parse_region(region)
    if not isinstance(region, (list, tuple)) or len(region) != 4 or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in region):
        raise ValueError(f"region must be four integers [y0, y1, x0, x1] or 'Y0:Y1,X0:X1', not {region!r}")
    return tuple(int(v) for v in region)  # type: ignore[return-value]


def parse_region(text: str) -> tuple[int, int, int, int]:
    """``"Y0:Y1,X0:X1"`` -> (y0, y1, x0, x1); anything else is refused with one message."""
    try:
        ys, xs = text.strip().split(",")
        (y0, y1), (x0, x1) = (tuple(int(v) for v in part.split(":")) for part in (ys, xs))
        return y0, y1, x0, x1
    except ValueError:
        raise ValueError(f"region must be Y0:Y1,X0:X1 in scan positions, such as 20:40,10:30; got {text!r}") from None
