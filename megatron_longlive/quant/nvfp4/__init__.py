"""nvfp4."""
