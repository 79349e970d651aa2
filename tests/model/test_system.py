import os
import sys
import threading

import pytest

from rrstem.model.system import lower_priority


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_lower_priority_changes_only_the_calling_thread():
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def worker():
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["ok"] = lower_priority(5)
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) - before

    t = threading.Thread(target=worker)
    t.start()
    t.join(5)
    assert seen == {"ok": True, "delta": min(5, 19 - main_before)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before
    assert lower_priority(0) is False
