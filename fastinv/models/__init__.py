"""fastinv.models."""
