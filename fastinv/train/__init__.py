"""fastinv.train."""
