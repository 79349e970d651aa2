"""rrstem.gui: the pyqtgraph dashboard, run as a separate process.

Entry points: ``main(argv)``, ``add_dashboard_args(subparsers)`` (for the
``rrstem`` CLI) and ``render_png(snapshot, path, ...)`` (offscreen render
for ``rrstem demo --headless``). Qt is imported only when they are called.
"""


def main(argv=None) -> int:
    from rrstem.gui.app import main as _main

    return _main(argv)


def add_dashboard_args(subparsers):
    from rrstem.gui.app import add_dashboard_args as _add

    return _add(subparsers)


def render_png(snapshot, path, frame_reply=None, index=None, size=(1800, 1050)):
    from rrstem.gui.app import render_png as _render

    return _render(snapshot, path, frame_reply=frame_reply, index=index, size=size)


__all__ = ["main", "add_dashboard_args", "render_png"]
