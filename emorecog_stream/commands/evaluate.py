"""`emorecog-stream evaluate` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    raise SystemExit("emorecog-stream evaluate: not implemented yet")
