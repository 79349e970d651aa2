"""The scan lifecycle (stream/lifecycle.py) driven directly: no threads, no sockets. Every way a scan can end,
superseded and refused scans, stale and orphan frames, and each ended scan handed on exactly once."""

import numpy as np
import pytest

from rrstem.stream.config import ServiceConfig
from rrstem.stream.detectors import Item
from rrstem.stream.incomplete import incomplete_detail
from rrstem.stream.lifecycle import Lifecycle
from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.protocol import End, Frames, Start
from rrstem.stream.snapshot import END_REASONS
from support import disc_frames


class Record:
    """A lifecycle with every callback recorded."""

    def __init__(self, **cfg):
        self.started, self.ended, self.failures, self.taken = [], [], [], []
        config = ServiceConfig(**{"out": None, "train": False, "preprocess": PreprocessConfig(calibration_frames=4),
                                  **cfg})
        self.lc = Lifecycle(config, on_start=self.started.append, on_end=self.ended.append,
                            on_frames=lambda scan, n: self.taken.append(n),
                            on_failure=lambda where, exc, scan_id: self.failures.append((where, scan_id, exc)))

    def start(self, scan_id, shape=(3, 4), frame=(32, 32)):
        self.lc.dispatch(Item("start", Start(scan_id=scan_id, scan_shape=shape, frame_shape=frame, dtype="uint16"),
                              scan_id=scan_id))

    def frames(self, scan_id, first, frames):
        self.lc.dispatch(Item("frames", Frames(scan_id=scan_id, first=first, count=len(frames)), frames=frames,
                              scan_id=scan_id))

    def end(self, scan_id, sent):
        self.lc.dispatch(Item("end", End(scan_id=scan_id, frames_sent=sent), scan_id=scan_id))


FRAMES = disc_frames(3, 4).reshape(12, 32, 32)


def test_a_scan_ends_by_its_end_message_and_is_handed_on_once():
    r = Record()
    r.start("a")
    r.frames("a", 0, FRAMES[:6])
    r.frames("a", 6, FRAMES[6:])
    assert r.lc.current.scan_id == "a" and not r.ended
    r.end("a", 12)
    (scan,) = r.ended
    assert scan is r.lc.current and scan.end_reason == "end" and scan.complete
    assert scan.counter_dict()["received"] == 12 and sum(r.taken) == 12
    r.end("a", 12)  # a repeated end changes nothing but a counter
    assert len(r.ended) == 1 and r.lc.orphans == {"end_repeated": 1}


def test_a_scan_ends_by_count_with_what_never_came_missing():
    r = Record()
    r.start("a")
    r.frames("a", 0, FRAMES[:10])
    r.end("a", 10)  # e.g. a detector's decoder at the announced frame count, two frames short
    (scan,) = r.ended
    assert scan.end_reason == "end" and not scan.complete
    assert scan.counter_dict()["missing"] == 2 and scan.frames_sent == 10


def ticks(lc, start, stop, every=0.1):
    """Tick as the pipeline thread does while its queue is empty: every 0.1 s."""
    for t in np.arange(start, stop + 1e-9, every):
        lc.tick(float(t))


def test_a_scan_without_messages_ends_idle_at_its_timeout_not_before():
    r = Record(idle_timeout=5.0)
    r.start("a")
    r.frames("a", 0, FRAMES[:8])
    last = r.lc.current.last_activity
    ticks(r.lc, last, last + 4.9)
    assert not r.ended
    ticks(r.lc, last + 5.0, last + 5.1)
    (scan,) = r.ended
    assert scan.end_reason == "idle" and scan.counter_dict()["missing"] == 4
    ticks(r.lc, last + 5.2, last + 7)  # an ended scan does not end again
    assert len(r.ended) == 1


def test_time_the_service_did_not_run_is_not_idle_time():
    r = Record(idle_timeout=5.0)
    r.start("a")
    r.frames("a", 0, FRAMES[:8])
    last = r.lc.current.last_activity
    ticks(r.lc, last, last + 2.0)
    r.lc.tick(last + 16.0)  # stopped (SIGSTOP) for 14 s: the first tick after it
    ticks(r.lc, last + 16.1, last + 18.9)
    assert not r.ended  # 2 + 2.9 s of idle time, under the 5 s timeout
    r.frames("a", 8, FRAMES[8:])  # what was waiting arrives
    r.end("a", 12)
    assert r.ended[0].end_reason == "end" and r.ended[0].complete


def test_a_stop_ends_the_running_scan_stopped_or_failed():
    r = Record()
    r.start("a")
    r.frames("a", 0, FRAMES[:8])
    r.lc.stop()
    assert [s.end_reason for s in r.ended] == ["stopped"]
    r.lc.stop()  # nothing runs: nothing ends
    r.start("b")
    r.frames("b", 0, FRAMES[:8])
    boom = RuntimeError("the receiver died")
    r.lc.stop(boom)
    assert [s.end_reason for s in r.ended] == ["stopped", "failed"] and r.ended[1].failure is boom
    assert incomplete_detail(r.ended[1]) == ("processing it failed (RuntimeError: the receiver died); 4 of 12 "
                                             "positions have no frame")


def test_a_new_start_supersedes_the_running_scan_and_its_late_frames_are_stale():
    r = Record()
    r.start("a")
    r.frames("a", 0, FRAMES[:8])
    r.start("b")
    assert [(s.scan_id, s.end_reason) for s in r.ended] == [("a", "superseded")]
    assert [s.scan_id for s in r.started] == ["a", "b"]
    r.frames("a", 8, FRAMES[8:])  # late frames of a: counted stale on b
    assert r.lc.current.counter_dict()["stale"] == 4
    r.end("b", 0)
    r.frames("a", 8, FRAMES[8:])  # after b ended too: an orphan
    assert r.lc.orphans["stale"] == 4


def test_a_refused_start_counts_its_frames_and_the_next_scan_runs():
    r = Record()
    r.start("huge", shape=(8192, 8192), frame=(256, 256))  # far more than this machine's memory
    assert r.lc.current is None and r.lc.orphans["rejected_start"] == 1
    assert "huge rejected" in r.lc.notice
    r.frames("huge", 0, FRAMES[:3])
    assert r.lc.orphans["rejected_scan"] == 3
    r.start("a")
    assert r.lc.notice is None and r.lc.current.scan_id == "a"


def test_frames_and_ends_of_unknown_scans_are_orphans():
    r = Record()
    r.frames("nobody", 0, FRAMES[:2])
    r.end("nobody", 2)
    r.lc.dispatch(Item("bad", reason="undecodable", detail="garbage"))
    assert r.lc.orphans == {"no_start": 2, "end_without_start": 1, "undecodable": 1}
    assert not r.started and not r.ended


def test_a_scan_whose_processing_fails_ends_failed_once_and_later_frames_are_counted():
    r = Record(preprocess=PreprocessConfig(bin=4, calibration_frames=2))
    r.start("tiny", shape=(2, 2), frame=(2, 2))
    r.frames("tiny", 0, np.ones((4, 2, 2), np.uint16))  # calibration raises: bin 4 > 2x2
    (scan,) = r.ended
    assert scan.end_reason == "failed" and "bin 4 is larger" in str(scan.failure)
    assert r.failures[0][:2] == ("pipeline", "tiny")
    r.frames("tiny", 0, np.ones((2, 2, 2), np.uint16))
    assert r.lc.orphans["failed_scan"] == 2 and len(r.ended) == 1


def test_end_reasons_are_declared_once():
    assert set(END_REASONS) == {"end", "idle", "stopped", "superseded", "failed", "running"}


@pytest.mark.parametrize("offset,flyback,taken", [(0, 0, 12), (2, 0, 10)])
def test_frames_go_through_the_acquisition_map(offset, flyback, taken):
    r = Record(sync_offset=offset, flyback=flyback)
    r.start("a")
    r.frames("a", 0, FRAMES)
    assert r.lc.current.counter_dict()["received"] == taken
