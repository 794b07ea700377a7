"""DAM: learned per-column merge coefficients (`bigmerge dam`)."""
