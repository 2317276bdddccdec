"""`python -m flows.cli ...` runs the console script."""

from flows.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
