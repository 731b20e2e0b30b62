"""`emorecog-stream train`: train the streaming EmoRecog-Net and write a checkpoint + metrics.

DATA is ``synth`` (the synthetic corpus, generated in memory; ``synth:SEED`` for another seed),
an XDF file or folder, a folder of ICBHI ``P{pp}_{trial}.mat`` files, or an official ICBHI
folder; several may be given. Every session goes through the same aligner as the live engine, so
the model trains on the heart and respiration rates it will be served. The split is by
participant (train P01-P12, validation P13-P14, test P15-P16 by default) or from a split file.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from emorecog_stream.cli import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        nargs="*",
        default=["synth"],
        metavar="DATA",
        help="'synth' (default), 'synth:SEED', an XDF file/folder, or an ICBHI folder",
    )
    parser.add_argument(
        "-o", "--out", type=Path, default=Path("emorecog-net.pt"), help="checkpoint to write"
    )
    parser.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help="metrics JSON to write (default: the checkpoint path with .metrics.json)",
    )
    split = parser.add_argument_group("split (by participant unless a split file says trials)")
    split.add_argument("--train", default="P01-P12", metavar="LIST", help="default: P01-P12")
    split.add_argument("--val", default="P13,P14", metavar="LIST", help="default: P13,P14")
    split.add_argument("--test", default="P15,P16", metavar="LIST", help="default: P15,P16")
    split.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help="CSV split like the seed's levelsplit.csv (overrides --train/--val/--test)",
    )
    split.add_argument(
        "--label-delay",
        type=float,
        default=None,
        metavar="S",
        help="hemodynamic delay for labelling volumes (default: 5 s; 0 s for ICBHI files)",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--seed", type=int, default=None, help="random seed (default: 2024)")
    opt.add_argument("--epochs", type=int, default=None, help="maximum epochs")
    opt.add_argument("--patience", type=int, default=None, help="early-stopping patience")
    opt.add_argument("--batch-size", type=int, default=None)
    opt.add_argument("--crop", type=int, default=None, help="volumes per training crop")
    opt.add_argument("--lr", type=float, default=None, help="learning rate")
    opt.add_argument("--category-weight", type=float, default=None, help="default 0.3")
    opt.add_argument("--intensity-weight", type=float, default=None, help="default 0.7")
    opt.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda (when PyTorch sees a GPU)"
    )
    opt.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines, no bars")


def _train_config(args: argparse.Namespace) -> Any:
    from emorecog_stream.model.training import TrainConfig

    overrides = {
        "seed": args.seed,
        "epochs": args.epochs,
        "patience": args.patience,
        "batch_size": args.batch_size,
        "crop_volumes": args.crop,
        "learning_rate": args.lr,
        "category_weight": args.category_weight,
        "intensity_weight": args.intensity_weight,
    }
    values = {k: v for k, v in overrides.items() if v is not None}
    for name in ("epochs", "patience", "batch_size", "crop_volumes"):
        if name in values and values[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected >= 1, got {values[name]}")
    if args.threads < 1:
        raise UsageError(f"--threads: expected >= 1, got {args.threads}")
    return TrainConfig(**values, device=args.device, threads=args.threads)


def main(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from emorecog_stream.model.checkpoint import save_checkpoint
    from emorecog_stream.model.data import (
        Split,
        load_sessions_from,
        parse_participants,
        read_split_file,
        session_data,
    )
    from emorecog_stream.model.training import make_inputs, score_inputs, train

    console = Console(stderr=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: PyTorch sees no CUDA device here (use --device cpu)")
    config = _train_config(args)
    try:
        if args.split_file is not None:
            split = read_split_file(args.split_file)
        else:
            split = Split.from_lists(
                parse_participants(args.train),
                parse_participants(args.val),
                parse_participants(args.test),
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    wanted = None if split.trials else set(split.participants)
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=args.no_progress,
    )
    datas = []
    with progress:
        sessions = []
        for spec in args.data:
            load = progress.add_task(f"loading {spec}", total=None, info="")
            try:
                sessions.extend(load_sessions_from(spec, wanted))
            except (OSError, ValueError) as exc:
                raise UsageError(f"data {spec!r}: {exc}") from exc
            progress.update(load, total=1, completed=1)
        if not sessions:
            raise UsageError(
                f"no sessions of participants {sorted(wanted or [])} in {args.data}"
                " (check --train/--val/--test or --split-file)"
            )
        align = progress.add_task("aligning", total=len(sessions), info="")
        for s in sessions:
            try:
                datas.append(session_data(s, args.label_delay))
            except ValueError as exc:
                raise UsageError(f"session {s.participant!r}: {exc}") from exc
            progress.update(align, advance=1, info=s.participant)
        epochs = progress.add_task("training", total=config.epochs, info="")

        def on_epoch(epoch: int, info: dict[str, Any]) -> None:
            text = f"loss {info['train_loss']:.3f}"
            if "val_loss" in info:
                text += (
                    f" | val loss {info['val_loss']:.3f} acc/trial"
                    f" {info['val_trial_accuracy']:.2f} | best epoch {info['best_epoch']}"
                )
            progress.update(epochs, completed=epoch, info=text)
            if args.no_progress:
                console.print(f"epoch {epoch}: {text}")

        try:
            result = train(datas, split, config, on_epoch)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    metrics: dict[str, Any] = {}
    cpu = torch.device("cpu")
    for name in ("val", "test"):
        masks = [split.mask(d, name) for d in datas]
        keep = [i for i, m in enumerate(masks) if m.any()]
        if keep:
            inputs = make_inputs([datas[i] for i in keep], [masks[i] for i in keep], config.net)
            metrics[name] = score_inputs(result.net, inputs, config, cpu)
            metrics[name]["participants"] = sorted({datas[i].participant for i in keep})
    training = {
        "data": list(args.data),
        "command": "emorecog-stream train " + shlex.join(sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "train"
        else None,
        "seed": config.seed,
        "split": split.describe(),
        "label_delay_s": sorted({d.label_delay for d in datas}),
        "sessions": [
            {
                "participant": d.participant,
                "volumes": d.n_volumes,
                "source": d.source,
                "data_digest": d.digest(),
            }
            for d in datas
        ],
        "train_config": config.to_dict(),
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(result.seconds, 1),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "threads": config.threads,
        "device": config.device,
    }
    model_id = save_checkpoint(result.net, args.out, training=training, metrics=metrics)
    metrics_path = args.metrics or args.out.with_suffix(".metrics.json")
    report = {"model_id": model_id, "checkpoint": str(args.out), **training}
    report["metrics"] = metrics
    report["history"] = result.history
    metrics_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    console.print(f"wrote {args.out} ({model_id}) and {metrics_path}")
    for name, m in metrics.items():
        trial, tr = m["per_trial"], m["per_tr"]
        console.print(
            f"{name} {m['participants']}: per trial acc {trial.get('accuracy', float('nan')):.3f}"
            f" F1 {trial.get('macro_f1', float('nan')):.3f}"
            f" MAE {trial.get('intensity_mae', float('nan')):.2f}"
            f" r {trial.get('intensity_pearson_r', float('nan')):.2f}"
            f" | per TR acc {tr.get('accuracy', float('nan')):.3f}"
            f" (chance {trial.get('chance_accuracy', float('nan')):.2f})"
        )
    console.print(f"training took {training['seconds']} s ({training['epochs_run']} epochs)")
    return 0
