"""The `gptserve` command: thin subcommands over the library (model/, export/, service/)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptserve", description=__doc__)
    subcommands = parser.add_subparsers(dest="command", required=True)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
