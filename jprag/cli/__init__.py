"""Command-line interface of jprag (wiring only; the work is done by the library)."""
