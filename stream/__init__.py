"""rrstem.stream."""
