"""`emorecog-stream evaluate CHECKPOINT DATA`: figures of a model on held-out sessions.

CHECKPOINT is a ``.pt`` file, ``default`` (the shipped checkpoint) or ``keras-v1:PATH``. DATA is
``synth`` (the synthetic corpus; its test participants P15, P16 by default), an XDF file or
folder, or an ICBHI folder (all its sessions by default). Sessions go through the live aligner,
then ``predict_sequence`` (which equals stepping volume by volume). Reported per TR (every
labelled volume) and per trial (the prediction at each trial's last labelled volume): category
accuracy, macro-F1, intensity MAE and Pearson r. The ICBHI Finalscore is not computed: its formula
is not published.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from emorecog_stream.cli import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a .pt file, 'default' or keras-v1:PATH"
    )
    parser.add_argument(
        "data", metavar="DATA", help="'synth', 'synth:SEED', an XDF file/folder or an ICBHI folder"
    )
    parser.add_argument(
        "--participants",
        default=None,
        metavar="LIST",
        help="participants to score, e.g. P15,P16 (default: P15,P16 for synth, else all)",
    )
    parser.add_argument(
        "--split-file", type=Path, default=None, help="score only this split's trials (CSV)"
    )
    parser.add_argument(
        "--split", default="test", help="which split of --split-file (default test)"
    )
    parser.add_argument(
        "--label-delay",
        type=float,
        default=None,
        metavar="S",
        help="hemodynamic delay for labelling volumes (default: 5 s; 0 s for ICBHI files)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")


def evaluate_sessions(model: Any, datas: list[Any], split: Any = None, split_name: str = "test"):
    """Figures of ``model`` on aligned, labelled sessions (see the module docstring)."""
    import numpy as np

    from emorecog_stream.model.metrics import evaluate_arrays

    items = []
    not_ready = 0
    for d in datas:
        out = model.predict_sequence(d.roi, d.heart_rate, d.respiration_rate)
        mask = d.category >= 0 if split is None else split.mask(d, split_name)
        ready = np.isfinite(out.probabilities).all(axis=1) & np.isfinite(out.intensity)
        not_ready += int((mask & ~ready).sum())
        mask = mask & ready
        items.append((out.probabilities, out.intensity, d.category, d.intensity, d.trial, mask))
    figures = evaluate_arrays(items)
    figures["volumes_without_prediction"] = not_ready
    return figures


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from emorecog_stream.model import load_model
    from emorecog_stream.model.checkpoint import CheckpointError
    from emorecog_stream.model.data import (
        DEFAULT_SPLIT,
        load_sessions_from,
        parse_participants,
        read_split_file,
        session_data,
    )

    console = Console()
    try:
        model = load_model(None if args.checkpoint == "default" else args.checkpoint)
    except (CheckpointError, OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if args.participants is not None:
        participants = parse_participants(args.participants)
    elif args.data == "synth" or args.data.startswith("synth:"):
        participants = list(DEFAULT_SPLIT["test"])
    else:
        participants = None
    split = None
    if args.split_file is not None:
        try:
            split = read_split_file(args.split_file)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    try:
        sessions = load_sessions_from(args.data, participants)
    except (OSError, ValueError) as exc:
        raise UsageError(f"data {args.data!r}: {exc}") from exc
    if not sessions:
        raise UsageError(f"no sessions of participants {participants} in {args.data!r}")
    try:
        datas = [session_data(s, args.label_delay) for s in sessions]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    figures = evaluate_sessions(model, datas, split, args.split)
    figures["model_id"] = model.model_id
    figures["data"] = args.data
    figures["participants"] = sorted({d.participant for d in datas})
    figures["label_delay_s"] = sorted({d.label_delay for d in datas})
    if split is not None:
        figures["split"] = {"file": str(args.split_file), "name": args.split, **split.describe()}

    table = Table(title=f"{model.model_id} on {args.data} {figures['participants']}")
    for col in ("view", "n", "accuracy", "chance", "macro-F1", "MAE", "MAE if 0", "Pearson r"):
        table.add_column(col, justify="right")
    for view in ("per_trial", "per_tr"):
        f = figures[view]

        def num(key: str, digits: int = 3, f: dict[str, Any] = f) -> str:
            value = f.get(key)
            return (
                "-"
                if value is None or (isinstance(value, float) and math.isnan(value))
                else (f"{value:.{digits}f}")
            )

        table.add_row(
            view.replace("_", " "),
            str(f.get("n", 0)),
            num("accuracy"),
            num("chance_accuracy"),
            num("macro_f1"),
            num("intensity_mae", 2),
            num("intensity_mae_predicting_0", 2),
            num("intensity_pearson_r"),
        )
    console.print(table)
    console.print(figures["finalscore"])
    if figures["volumes_without_prediction"]:
        console.print(
            f"{figures['volumes_without_prediction']} labelled volumes had no prediction yet"
            " (a windowed model filling its window) and are not scored"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
        console.print(f"wrote {args.json}")
    return 0
