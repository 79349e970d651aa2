"""rrstem.gui."""
