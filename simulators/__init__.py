"""rrstem.simulators."""
