"""`python -m qpass` — command-line entry (subcommands are added by later work)."""

import sys


def main(argv=None) -> int:
    print("usage: python -m qpass <command>; no commands yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
