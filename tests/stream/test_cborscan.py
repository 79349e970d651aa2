"""The compiled walk through stream2 image messages (``cborscan.ImageWalk``): it takes the plain messages a
DCU sends, with their exact image id and pixels, and whatever it takes, cbor2 reads the same way (or cannot
read at all, for a damaged field the walk does not use, such as a date). Unusual or foreign messages it
leaves to cbor2: never a different frame, never a read past the buffer."""

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rrstem.simulators.dectris import Stream2Encoder
from rrstem.stream.detectors.cborscan import ImageWalk
from rrstem.stream.detectors.stream2 import Stream2Decoder
from rrstem.stream.protocol import Start

SHAPE = (6, 5)
NBYTES = SHAPE[0] * SHAPE[1] * 2
START = Start(scan_id="walk", scan_shape=(4, 4), frame_shape=SHAPE, dtype="uint16")


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65535, SHAPE, dtype=np.uint16, endpoint=True)


def walk(uid="walk", channel="threshold_1", series=3) -> ImageWalk:
    return ImageWalk(series, uid, channel, SHAPE, 69, NBYTES)


def take(w: ImageWalk, message: bytes):
    block = np.zeros((2, NBYTES), np.uint8)
    index = w.take(message, block, 1)
    assert not block[0].any()  # only the row asked for is written
    return None if index is None else (index, block[1].view("<u2").reshape(SHAPE))


def slow(message: bytes, series=3):
    """(image id, pixels) as the cbor2 path takes the message, or None."""
    dec = Stream2Decoder((4, 4))
    dec.decode(Stream2Encoder(START, series=series).header())
    try:
        msg = dec._loads([message])
    except Exception:
        return None
    hit = dec._fast_image(msg)
    return None if hit is None else (hit[0], np.frombuffer(hit[1], "<u2").reshape(SHAPE))


def test_the_walk_takes_a_dcu_image_with_its_id_and_pixels():
    enc = Stream2Encoder(START, series=3)
    pixels = frame(1)
    got = take(walk(), enc.image(70000, pixels)[0])  # an id of 4 bytes
    assert got[0] == 70000
    np.testing.assert_array_equal(got[1], pixels)
    without_tag = enc.image(5, pixels)[0][3:]  # not self-described: taken as well
    assert take(walk(), without_tag)[0] == 5


def test_the_walk_leaves_other_series_shapes_types_and_compressed_images_to_cbor2():
    enc = Stream2Encoder(START, series=3)
    message = enc.image(2, frame(2))[0]
    assert take(walk(series=4), message) is None  # another series id
    assert take(walk(uid="other"), message) is None  # another unique id
    assert take(walk(uid=None), message) is None  # the series had no unique id; this image has one
    assert take(ImageWalk(3, "walk", "threshold_1", (5, 6), 69, NBYTES), message) is None  # the shape
    assert take(ImageWalk(3, "walk", "threshold_1", SHAPE, 70, NBYTES), message) is None  # uint32 tag
    lz4 = Stream2Encoder(START, series=3, compression="lz4").image(2, frame(2))[0]
    assert take(walk(), lz4) is None
    assert take(walk(), enc.header()[0]) is None and take(walk(), enc.end()[0]) is None
    for cut in range(len(message)):  # every truncation, and trailing bytes
        assert take(walk(), message[:cut]) is None
    assert take(walk(), message + b"\x00") is None


def test_the_walk_picks_the_channel_as_cbor2_does_and_refuses_repeated_fields():
    enc = Stream2Encoder(START, series=3)
    msg = cbor2.loads(enc.image(9, frame(3))[0][3:])
    other = cbor2.loads(enc.image(9, frame(4))[0][3:])["data"]["threshold_1"]
    two = cbor2.dumps({**msg, "data": {"threshold_0": other, "threshold_1": msg["data"]["threshold_1"]}})
    np.testing.assert_array_equal(take(walk(), two)[1], frame(3))  # the named channel, not the first
    assert take(walk(channel="threshold_2"), two) is None  # not there, two channels: cbor2 takes the first
    alone = cbor2.dumps({**msg, "data": {"threshold_0": other}})
    np.testing.assert_array_equal(take(walk(), alone)[1], frame(4))  # one channel, not the named one: it
    np.testing.assert_array_equal(slow(alone)[1], frame(4))  # as cbor2's path takes it
    body = cbor2.dumps(msg)
    repeated = bytes([body[0] + 1]) + body[1:] + cbor2.dumps("image_id") + cbor2.dumps(10)
    assert cbor2.loads(repeated)["image_id"] == 10  # cbor2 keeps the last
    assert take(walk(), repeated) is None


KEYS = st.sampled_from(["type", "series_id", "series_unique_id", "image_id", "data", "start_time", "user_data",
                        "real_time", "series_date", "x"])
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**64 + 1, 2**64 - 1) | st.floats() | st.text(max_size=8)
                      | st.binary(max_size=8), lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.dictionaries(KEYS, VALUES, max_size=4), order=st.randoms(use_true_random=False),
       index=st.integers(0, 2**40), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_whatever_the_walk_takes_cbor2_takes_the_same_way(extra, order, index, flips, cut):
    enc = Stream2Encoder(START, series=3)
    msg = {**cbor2.loads(enc.image(index, frame(index % 7))[0][3:]), **extra}
    keys = list(msg)
    order.shuffle(keys)
    message = bytearray(cbor2.dumps({k: msg[k] for k in keys}))
    for at, byte in flips:
        message[at % len(message)] = byte
    if cut is not None:
        message = message[:cut % (len(message) + 1)]
    fast, reference = take(walk(), bytes(message)), slow(bytes(message))
    if fast is not None and reference is None:  # only where a field the walk does not read is damaged
        with pytest.raises(cbor2.CBORDecodeError):
            cbor2.loads(bytes(message))
    elif fast is not None:
        assert fast[0] == reference[0]
        np.testing.assert_array_equal(fast[1], reference[1])
    if not flips and cut is None and not extra:
        assert fast is not None  # a plain message, in any key order: the walk takes it
