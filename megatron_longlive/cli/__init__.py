"""Thin command-line entry points; the library itself parses no CLI."""
