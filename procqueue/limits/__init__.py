"""Flow-control primitives (placeholder until the limits module lands)."""
