"""The ``emorecog-stream`` command line: a thin dispatcher over ``emorecog_stream.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from emorecog_stream import __version__

COMMANDS: dict[str, str] = {
    "demo": "replay a shipped session into the engine with an embedded MQTT broker",
    "run": "run the engine on live LSL streams and publish predictions",
    "replay": "turn recorded sessions into LSL streams with their original timing",
    "listen": "subscribe to an MQTT broker and print predictions",
    "synth": "generate the deterministic synthetic replay corpus",
    "train": "train the streaming EmoRecog-Net model",
    "evaluate": "evaluate a checkpoint on held-out sessions",
    "convert": "convert published Keras v1.0 weights (HDF5) to a PyTorch checkpoint",
    "scanner-sim": "write a rehearsal session as scanner volume files at TR pace",
    "scanner": "watch the scanner's export folder and publish motion-corrected ROI means on LSL",
    "web": "serve the live feedback and experimenter pages in the browser",
    "report": "turn a session log (JSONL) into a self-contained HTML report",
    "rerun": "feed recordings through the live pipeline at full speed (logs, MQTT)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emorecog-stream",
        description="Real-time emotion recognition from fMRI and physiology (research software,"
        " not a medical device).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"emorecog_stream.commands.{name.replace('-', '_')}")
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.main(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        print(f"emorecog-stream {args.command}: error: {exc}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """A user mistake (bad file, bad config, unreachable broker): printed without a traceback."""
