"""procqueue command line."""
