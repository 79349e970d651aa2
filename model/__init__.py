"""rrstem.model."""
