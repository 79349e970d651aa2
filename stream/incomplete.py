"""Why a scan is incomplete, in one sentence for people: the ``incomplete_detail`` of its results.

Everything it says is derived from what the scan owns: how it ended
(``end_reason``, the failure), what its source said was wrong with it (the
start's ``metadata``: ``source_problem``, which names a damaged file and its
skipped frames, and ``skipped_frames_count``), the positions that hold no
frame (``missing``), the frames that came but were invalid, by reason, and
the frames the sender sent that never arrived (``frames_unaccounted``).
"""

from __future__ import annotations

from rrstem.stream.acquisition import FLYBACK, SYNC_OFFSET

#: How each way a scan ends, other than its end message, is said.
ENDINGS = {
    "idle": "it ended when no frames came for the idle timeout (the sender died, or the acquisition was aborted)",
    "stopped": "the service was stopped before the scan's end",
    "superseded": "a new scan started before this one's end message",
    "running": "it is still running (this is a checkpoint)",
}


def incomplete_detail(scan) -> str | None:
    """Why ``scan`` (a ``stream.scan.Scan``) is incomplete, or None when it is complete."""
    if scan.complete:
        return None
    parts = []
    reason = scan.end_reason or "running"
    if reason == "failed" or scan.failure is not None:
        failure = scan.failure
        parts.append(f"processing it failed ({type(failure).__name__}: {failure})" if failure is not None
                     else "processing it failed")
    elif reason in ENDINGS:
        parts.append(ENDINGS[reason])
    problem = scan.start.metadata.get("source_problem")
    if problem:
        parts.append(str(problem))
    n = scan.start.n_positions
    missing = scan.counters["missing"] if scan.ended else n - scan.n_filled()
    if missing:
        have = "has" if missing == 1 else "have"
        parts.append(f"{missing} of {n} positions {have if scan.ended else have + ' so far'} no frame")
    invalid = {k: v for k, v in scan.reasons.items() if v and k not in (SYNC_OFFSET, FLYBACK)}  # those are expected
    if invalid:
        listed = ", ".join(f"{k} {v}" for k, v in sorted(invalid.items()))
        count = sum(invalid.values())
        parts.append(f"{count} frame{' was' if count == 1 else 's were'} invalid ({listed})")
    if scan.unaccounted:
        parts.append(f"the sender says it sent {scan.frames_sent} frames; {scan.unaccounted} of them never arrived")
    return "; ".join(parts) or f"{reason}: incomplete"
