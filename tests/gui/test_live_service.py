"""The dashboard against the real service: frames streamed in, maps drawn, a click served by the service."""

import numpy as np

from rrstem.gui.window import Dashboard
from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.results import read_scan
from rrstem.stream.service import Service, ServiceConfig
from support import Sender, disc_frames, reference

WAIT = 10000  # ms


def test_dashboard_draws_the_service_maps_and_fetches_a_frame(qtbot, tmp_path):
    frames = disc_frames(6, 7, seed=31)
    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish="tcp://127.0.0.1:0",
                        control="tcp://127.0.0.1:0", out=tmp_path / "r.h5", train=False,
                        preprocess=PreprocessConfig(calibration_frames=8))
    with Service(cfg) as svc:
        dash = Dashboard(connect=svc.publish_endpoint, poll_ms=20)  # control endpoint: advertised by the service
        qtbot.addWidget(dash)
        dash.show()
        sender = Sender(svc.listen_endpoint)
        sender.start("live", (6, 7), (32, 32))
        sender.frames("live", 0, frames.reshape(42, 32, 32)[:21])  # half the scan: rows 0-2
        sender.end("live", 21)
        qtbot.waitUntil(lambda: len(svc.results_written) == 1, timeout=WAIT)
        qtbot.waitUntil(lambda: dash.snapshot is not None and dash.snapshot.header.state == "done", timeout=WAIT)
        res = read_scan(svc.results_written[0][1])
        # the image item holds the service's map: float32 of the results' float64, NaN where no frame came
        np.testing.assert_array_equal(dash.maps["vbf"].image.image, res["maps"]["vbf"].astype(np.float32))
        assert np.isnan(dash.maps["vbf"].image.image[3:]).all()
        assert dash.control_endpoint == svc.control_endpoint
        dash.select((1, 4))  # what a click on position (y=1, x=4) does
        ref = reference(frames, res["attrs"]["geometry"])["binned"][1, 4].astype(np.float32)

        def frame_shown():
            img = dash.patterns["frame"].image.image
            return img is not None and np.array_equal(img, ref)

        qtbot.waitUntil(frame_shown, timeout=WAIT)  # served by the service's control socket
        sender.close()
        dash.close()
