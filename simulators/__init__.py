"""rrstem.simulators: frame sources that stream like a detector.

- ``GrapheneSource`` / ``simulate``: synthetic graphene scan (``graphene``).
- ``open_file`` / ``load_array``: replay of recorded files, one reader per format (``files``, ``formats/``).
- ``Source``, ``ArraySource``, ``stream``: the shared interface and sender (``source``).
- ``add_simulate_args``, ``add_replay_args``: CLI subcommands (``cli``).
- ``SENDERS``: the sender of every protocol in ``stream.detectors.PROTOCOLS`` (``senders``; the senders
  themselves: ``source.stream``, ``dectris.stream_detector``, ``merlin.serve_merlin``).
"""

from rrstem.simulators.files import load_array, open_file
from rrstem.simulators.graphene import GrapheneSource, simulate
from rrstem.simulators.source import ArraySource, Source, StreamStats, stream

__all__ = ["ArraySource", "GrapheneSource", "Source", "StreamStats", "load_array", "open_file", "simulate", "stream"]
