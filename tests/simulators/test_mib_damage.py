"""Damaged Merlin ``.mib`` files give up exactly their damaged frames: headers corrupted and bytes deleted here,
at frame 0, in the middle of a chunk and at the end; the maps of every other frame equal a NumPy reference."""

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
    path = write_mib(tmp_path / "scan.mib", frames.reshape(-1, H, H), scan_xy=(NX, NY), **kw)
    return frames, path


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


@pytest.mark.parametrize("lost", [[0], [40], [40, 41], [63]])
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
    assert detail.startswith(f"scan.mib is damaged: {len(lost)} of its 64 frames skipped (frames {lost[0]} at offset "
                             f"{lost[0] * RECORD}")
    assert detail.endswith(f"{len(lost)} of 64 positions have no frame")


def test_frame_0_damaged_is_reported_as_frame_0(tmp_path):
    frames, path = write(tmp_path, seed=9)
    damage_header(path, 0, b"MQ1,000001,00384,01,0016,0016,U08")  # parses, but its record size is wrong
    with open_file(path) as src:
        assert [s.as_dict() for s in src.skipped] == [
            {"frame": 0, "offset": 0, "reason": "its frame header is damaged (no valid header there)"}]
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
