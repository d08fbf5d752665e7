"""Internal utilities (progress output, timing)."""
