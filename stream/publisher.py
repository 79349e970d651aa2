"""Snapshots on a PUB socket (<= snapshot_hz) and commands on a REP control socket, in one thread.

Both sockets belong to this thread alone (ZeroMQ sockets are not thread-safe).
A snapshot is built from the service's merged sums only when it is sent;
between changes a 1 Hz heartbeat keeps dashboards' "service unreachable"
banners honest.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import numpy as np
import zmq

from rrstem.stream import control as ctl
from rrstem.stream.snapshot import Snapshot, SnapshotHeader

log = logging.getLogger("rrstem.publisher")


class Publisher:
    def __init__(self, service, context: zmq.Context, publish: str | None, control: str | None):
        self.service = weakref.proxy(service)  # no reference cycle: a closed service is freed at once
        self.seq = 0
        self._pub = self._rep = None
        self.publish_endpoint = self.control_endpoint = None  # actual endpoints (port 0 resolved)
        if publish:
            self._pub = context.socket(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, 4)  # slow subscribers lose snapshots, never slow us
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.bind(publish)
            self.publish_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        if control:
            self._rep = context.socket(zmq.REP)
            self._rep.setsockopt(zmq.LINGER, 0)
            self._rep.bind(control)
            self.control_endpoint = self._rep.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        for sock in (self._pub, self._rep):
            if sock is not None:
                sock.close(linger=0)

    def frames_per_s(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.service.rate_window) if now - t <= 2.0]  # copy: the pipeline appends
        if len(recent) < 2 or now - recent[0][0] <= 0:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / max(now - recent[0][0], 1e-3)

    def header(self) -> SnapshotHeader:
        cur = self.service.current
        h = SnapshotHeader(seq=self.seq, error=self.service.last_error(),
                           frames_per_s=self.frames_per_s(),
                           control=self.control_endpoint, orphans=dict(self.service.orphans))
        if self.service.trainer is not None:
            h.training = self.service.trainer.status()
        if cur is None:
            return h
        h.scan_id, h.scan_shape, h.frame_shape = cur.scan_id, list(cur.start.scan_shape), list(cur.start.frame_shape)
        h.expected, h.counters = cur.start.n_positions, cur.counter_dict()
        h.calibration = cur.start.calibration.model_dump(mode="json", exclude_none=True)
        if cur.ready.is_set():  # geometry, reductions and store all exist (set last in calibration)
            h.binned_shape, h.geometry = list(cur.geometry.binned_shape), cur.geometry.to_json()
            h.geometry.pop("masked")
            h.com_unit = cur.positions.unit
        training_state = h.training.get("state") if h.training else None
        if not cur.ended:
            h.state = "acquiring"
        elif cur.scan_id not in self.service.finished:
            h.state = "consolidating" if training_state == "consolidating" else "finishing"
        else:
            h.state = "done"
        return h

    def snapshot(self) -> Snapshot:
        self.seq += 1
        header = self.header()
        arrays: dict[str, np.ndarray] = {}
        if self.service.current is not None:
            # float32 is plenty for display and halves what every subscriber receives
            arrays.update({k: v.astype(np.float32) if v.dtype == np.float64 else v
                           for k, v in self.service.current.snapshot().items()})
            arrays.update(self.service._trainer_maps(self.service.current))
            if self.service.trainer is not None and self.service.current.ready.is_set():
                arrays.update({f"training/{k}": np.asarray(v) for k, v in self.service.trainer.histories().items()})
        return Snapshot(header, arrays)

    def run(self) -> None:
        """The thread body: serve control requests, publish when due, until the service stops."""
        period = 1.0 / self.service.cfg.snapshot_hz
        next_pub, last_key, last_sent = 0.0, None, 0.0
        while not self.service.stop_event.is_set():
            now = time.monotonic()
            if self._rep is not None and self._rep.poll(max(1, int(min(next_pub - now, 0.1) * 1000))):
                self._rep.send(ctl.pack(self._control(self._rep.recv())))
                continue
            now = time.monotonic()
            if now < next_pub:
                if self._rep is None:
                    time.sleep(min(next_pub - now, 0.1))
                continue
            next_pub = now + period
            key = self._change_key()
            if self._pub is not None and (key != last_key or now - last_sent >= 1.0):  # 1 Hz heartbeat when idle
                try:
                    parts = self.snapshot().encode()
                except Exception as exc:  # a bad snapshot is reported; the service and later snapshots go on
                    log.exception("snapshot failed")
                    self.service.report(f"snapshot failed: {exc!r}")
                    continue
                self._pub.send_multipart(parts, copy=False)
                last_key, last_sent = key, now

    def _change_key(self) -> tuple:
        cur = self.service.current
        step = self.service.trainer.status().get("step") if self.service.trainer is not None else None
        return (id(cur), cur and sum(cur.counters.values()), cur and cur.ended, step, len(self.service.errors),
                sum(self.service.orphans.values()), cur.scan_id in self.service.finished if cur else None)

    def _control(self, raw: bytes) -> dict[str, Any]:
        try:
            req = ctl.unpack(raw)
            cmd = req.get("cmd")
            if cmd not in ctl.COMMANDS:
                return {"ok": False, "error": f"unknown command {cmd!r}; commands: {', '.join(ctl.COMMANDS)}"}
            return {"ok": True, **self._command(cmd, req)}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _command(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        if cmd == "status":
            return {"status": self.header().model_dump(mode="json")}
        if cmd == "save":
            return {"path": str(self.service.save())}
        if cmd == "stop":
            self.service.stop_event.set()
            return {}
        if cmd == "frame":
            return self.frame_reply(req.get("index"))
        if self.service.trainer is None:
            raise ValueError("training is disabled (serve was started with --no-train)")
        getattr(self.service.trainer, {"pause_training": "pause", "resume_training": "resume",
                               "reset_model": "reset_model"}[cmd])()
        return {"training": self.service.trainer.status()}

    def frame_reply(self, index: Any) -> dict[str, Any]:
        """The ``frame`` control reply for scan position ``index`` = [y, x] (arrays packed)."""
        cur = self.service.current
        if cur is None or not cur.ready.is_set():
            raise ValueError("no frames yet")
        ny, nx = cur.start.scan_shape
        if not (isinstance(index, (list, tuple)) and len(index) == 2
                and all(isinstance(v, (int, np.integer)) for v in index)):
            raise ValueError(f"index must be [y, x] integers, got {index!r}")
        y, x = (int(v) for v in index)
        if not (0 <= y < ny and 0 <= x < nx):
            raise ValueError(f"position ({y}, {x}) is outside the {ny}x{nx} scan")
        i = y * nx + x
        if not cur.store.filled[i]:
            raise ValueError(f"no frame at ({y}, {x}) yet")
        out = {"index": [y, x], "frame": ctl.pack_array(cur.store.frames[i]),
               "mean": ctl.pack_array(cur.data.mean_pattern())}
        if self.service._trainer_maps(cur):
            inp, recon = self.service.trainer.reconstruct(i)
            out.update(input=ctl.pack_array(inp), recon=ctl.pack_array(recon), residual=ctl.pack_array(inp - recon))
        return out
