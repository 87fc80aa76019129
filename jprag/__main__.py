"""`python -m jprag ...` runs the command-line interface."""

from jprag.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
