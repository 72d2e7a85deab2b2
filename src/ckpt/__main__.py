"""``python -m ckpt``: the ckpt command line."""
from ckpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
