"""Fixtures for the streaming core: a running service on port-0 sockets and PUSH senders."""

from __future__ import annotations

import pytest

from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.service import Service, ServiceConfig
from support import Sender


@pytest.fixture
def make_service(tmp_path):
    services = []

    def make(**kw):
        pre = kw.pop("preprocess", {})
        base = dict(listen="tcp://127.0.0.1:0", bind=True, publish="tcp://127.0.0.1:0",
                    control="tcp://127.0.0.1:0", out=tmp_path / "results.h5", train=False)
        cfg = ServiceConfig(**{**base, **kw}, preprocess=PreprocessConfig(**{"calibration_frames": 8, **pre}))
        svc = Service(cfg).start()
        services.append(svc)
        return svc

    yield make
    for svc in services:
        svc.close()


@pytest.fixture
def sender_for():
    senders = []

    def make(service):
        s = Sender(service.listen_endpoint)
        senders.append(s)
        return s

    yield make
    for s in senders:
        s.close()
