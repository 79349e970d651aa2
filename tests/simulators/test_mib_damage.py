"""Damaged Merlin ``.mib`` files give up exactly their damaged frames: headers corrupted and bytes deleted here,
at frame 0, in the middle of a chunk and at the end, records missing or written twice; every frame lands at its
own position (its sequence number - 1), and the maps of every other frame equal a NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from support import disc_frames, reference
from rrstem.cli import main
from rrstem.simulators.files import open_file
from rrstem.simulators.merlin import write_mib
from rrstem.stream.results import read_scan

NY, NX, H = 8, 8, 16  # 64 frames: one chunk of frames per message holds them all
RECORD = 384 + H * H * 2


def write(tmp_path, seed=0, **kw):
    frames = disc_frames(NY, NX, H, H, seed=seed, dtype=np.uint16, level=1000.0)
    path = write_mib(tmp_path / "scan.mib", frames.reshape(-1, H, H), **{"scan_xy": (NX, NY), **kw})
    return frames, path


def rewrite_records(path, order: list[int]) -> None:
    """The file's records in ``order`` (by their index in the file as written): some left out or repeated."""
    raw = path.read_bytes()
    path.write_bytes(b"".join(raw[k * RECORD:(k + 1) * RECORD] for k in order))


def damage_header(path, frame: int, new: bytes = b"XXXX") -> None:
    raw = bytearray(path.read_bytes())
    raw[frame * RECORD:frame * RECORD + len(new)] = new
    path.write_bytes(bytes(raw))


def analyze(path, *extra):
    out = path.with_suffix(".rrstem.h5")
    code = main(["analyze", str(path), "--no-train", "--no-progress", "--calibration-frames", "8", "--out", str(out),
                 *extra])
    return code, read_scan(out)


def assert_only_missing(res, frames, lost: list[int]):
    """Exactly the positions ``lost`` are missing, and every other one's maps equal NumPy's."""
    filled = np.ones(NY * NX, bool)
    filled[lost] = False
    filled = filled.reshape(NY, NX)
    np.testing.assert_array_equal(res["maps"]["filled"], filled)
    assert res["attrs"]["counters"]["missing"] == len(lost)
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"), filled=filled)
    for name in ("vbf", "vadf"):
        np.testing.assert_array_equal(res["maps"][name][filled], ref[name][filled])
    np.testing.assert_allclose(res["maps"]["com_x"][filled], ref["com_x"][filled], rtol=0, atol=1e-9)
    assert np.isnan(res["maps"]["vbf"][~filled]).all()


@pytest.mark.parametrize("lost", [[0], [1], [40], [40, 41], [63]])
def test_corrupted_headers_cost_their_frames_only(tmp_path, lost):
    frames, path = write(tmp_path, seed=len(lost) + lost[0])
    for k in lost:
        damage_header(path, k)
    with open_file(path) as src:
        assert [s.frame for s in src.skipped] == lost
        assert [s.offset for s in src.skipped] == [k * RECORD for k in lost]
    code, res = analyze(path)
    assert code == 1
    assert_only_missing(res, frames, lost)
    assert [s["frame"] for s in res["attrs"]["skipped_frames"]] == lost
    detail = res["attrs"]["incomplete_detail"]
    said = "; ".join(f"frame {k} at offset {k * RECORD}: its frame header is damaged (no valid header there)"
                     for k in lost)
    assert detail == (f"scan.mib is damaged: {len(lost)} of its 64 frames skipped ({said}); the other {64 - len(lost)} "
                      f"frames are read; {len(lost)} of 64 positions {'have' if len(lost) > 1 else 'has'} no frame")


def test_frame_0_damaged_is_reported_as_frame_0(tmp_path):
    frames, path = write(tmp_path, seed=9)
    damage_header(path, 0, b"MQ1,000001,00384,01,0016,0016,U08")  # parses, but its record size is wrong
    with open_file(path) as src:
        assert [s.as_dict() for s in src.skipped] == [
            {"frame": 0, "offset": 0, "reason": "its frame header is damaged (disagrees with the acquisition's)"}]
        assert src.first.pixel_type == "U16"  # the reference is frame 1's header, confirmed by frame 2's
    code, res = analyze(path)
    assert code == 1
    assert_only_missing(res, frames, [0])


@pytest.mark.parametrize("frame, cut", [(0, 100), (20, 7), (40, RECORD // 2)])
def test_bytes_deleted_lose_the_frame_they_were_in(tmp_path, frame, cut):
    frames, path = write(tmp_path, seed=frame)
    raw = path.read_bytes()
    at = frame * RECORD + 384 + 50  # inside the frame's pixels: later records shift by `cut` bytes
    path.write_bytes(raw[:at] + raw[at + cut:])
    with open_file(path) as src:
        assert [s.frame for s in src.skipped] == [frame]
        assert src.skipped[0].reason == (
            "its record runs into damage: the next frame header does not follow it" if frame == 0 else
            f"its record runs into damage: the next frame header lies {-cut:+d} bytes from where the record size "
            "puts it")
    code, res = analyze(path)
    assert code == 1
    assert_only_missing(res, frames, [frame])


def test_bytes_inserted_and_a_truncated_end(tmp_path):
    frames, path = write(tmp_path, seed=5)
    raw = path.read_bytes()
    at = 30 * RECORD + 384 + 10
    damaged = raw[:at] + b"\x07" * 33 + raw[at:]
    path.write_bytes(damaged[:len(damaged) - RECORD // 3])  # and the last frame loses its end
    with open_file(path) as src:
        assert [s.frame for s in src.skipped] == [30, 63]
        assert src.skipped[1].reason.startswith("truncated: the file ends")
        assert src.n_frames == 64 and src.available_frames == 62
    code, res = analyze(path)
    assert code == 1
    assert_only_missing(res, frames, [30, 63])


def test_a_garbage_hdr_is_refused_without_a_scan_shape_and_ignored_with_one(tmp_path, capsys):
    frames, path = write(tmp_path, seed=3)
    path.with_suffix(".hdr").write_bytes(bytes(range(256)) * 4)
    assert main(["analyze", str(path), "--no-train", "--no-progress"]) == 2
    assert "scan.hdr (the .hdr of scan.mib) cannot be read" in capsys.readouterr().err
    code, res = analyze(path, "--scan-shape", f"{NY}x{NX}")
    assert code == 0 and res["attrs"]["complete"] and "incomplete_detail" not in res["attrs"]
    assert_only_missing(res, frames, [])


def test_a_file_of_no_good_header_is_refused(tmp_path):
    _, path = write(tmp_path, seed=1)
    path.write_bytes(path.read_bytes().replace(b"MQ1,", b"MQ2,"))
    with pytest.raises(ValueError, match=r"scan.mib is not a Merlin .mib file: no MQ1 frame header in it parses"):
        open_file(path)


@pytest.mark.parametrize("absent", [0, 1, 30, 63])
def test_a_record_missing_from_the_file_costs_its_position_only(tmp_path, absent):
    """Merlin numbers frames from 1: a missing record leaves its position empty and every other frame at its own
    (the frame before it keeps its place too). The .hdr has no ScanX/ScanY: its 64 frames at 8 per trigger are
    the 8x8 scan, also when the file's last record is the one missing."""
    frames, path = write(tmp_path, seed=absent, scan_xy=None, frames_per_trigger=NX)
    rewrite_records(path, [k for k in range(NY * NX) if k != absent])
    reason = ("not in the file: it ends before them (its .hdr says the acquisition has 64 frames)" if absent == 63 else
              f"not in the file: no record has sequence number {absent + 1}")
    with open_file(path) as src:
        assert src.n_frames == 64 and src.start.scan_shape == (NY, NX)
        assert [s.as_dict() for s in src.skipped] == [
            {"frame": absent, "offset": min(absent, 63) * RECORD, "reason": reason}]
    code, res = analyze(path)
    assert code == 1
    assert_only_missing(res, frames, [absent])
    assert res["attrs"]["incomplete_detail"].startswith(
        f"scan.mib is damaged: 1 of its 64 frames skipped (frame {absent} at offset {min(absent, 63) * RECORD}: not in "
        f"the file); the other 63 frames are read")


def test_records_missing_with_a_scan_shape_given_and_two_reasons_said_in_order(tmp_path):
    frames, path = write(tmp_path, seed=11, hdr=False)
    rewrite_records(path, [k for k in range(NY * NX) if k not in (0, 50, 51)])
    damage_header(path, 19)  # the file's 20th record: frame 20
    code, res = analyze(path, "--scan-shape", f"{NY}x{NX}")
    assert code == 1
    assert_only_missing(res, frames, [0, 20, 50, 51])
    assert res["attrs"]["skipped_frames"] == [
        {"frame": 0, "offset": 0, "reason": "not in the file: no record has sequence number 1"},
        {"frame": 20, "offset": 19 * RECORD, "reason": "its frame header is damaged (no valid header there)"},
        {"frame": 50, "offset": 49 * RECORD, "reason": "not in the file: no record has sequence numbers 51 to 52",
         "count": 2}]
    assert res["attrs"]["incomplete_detail"] == (
        f"scan.mib is damaged: 4 of its 64 frames skipped (frame 0 at offset 0: not in the file; frame 20 at offset "
        f"{19 * RECORD}: its frame header is damaged (no valid header there); frames 50 to 51 at offset {49 * RECORD}: "
        f"not in the file); the other 60 frames are read; 4 of 64 positions have no frame")


def test_a_record_written_twice_is_a_duplicate_and_the_frames_after_keep_their_places(tmp_path):
    frames, path = write(tmp_path, seed=12)
    rewrite_records(path, [*range(6), 5, *range(6, NY * NX)])
    with open_file(path) as src:
        assert [s.as_dict() for s in src.skipped] == [
            {"frame": 5, "offset": 6 * RECORD, "reason": "duplicate of frame 5", "count": 0}]
        assert src.n_frames == 64 and src.available_frames == 64
        assert src.problem == (f"scan.mib is damaged: 1 record ignored (frame 5 at offset {6 * RECORD}: duplicate of "
                               f"frame 5); all 64 frames are read")
    code, res = analyze(path)
    assert code == 0
    assert_only_missing(res, frames, [])
