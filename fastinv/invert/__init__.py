"""fastinv.invert."""
