"""``python -m densemtl`` (and ``torchrun -m densemtl``) runs the command line."""

from densemtl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
