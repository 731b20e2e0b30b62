"""`emorecog-stream convert`: published Keras v1.0 weights (HDF5) -> a PyTorch checkpoint.

Reading the 0.7 GB ModelCheckpoint file takes a few seconds and h5py; the converted ``.pt`` holds
only the 87M weights (about 347 MB) plus the sizes and the source file's name and SHA-256, and
``run --model v1.pt`` / ``load_model("v1.pt")`` accept it (``keras-v1:PATH`` too). No TensorFlow.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        metavar="KERAS_FILE",
        help="Keras file: full-model .h5 (bestmodel_02815.h5), .weights.h5 or .keras",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT.pt",
        help="checkpoint to write (default: the input's name with .pt)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite OUT.pt if it exists")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")


def default_output(path: Path) -> Path:
    name = path.name
    for suffix in (".weights.h5", ".h5", ".hdf5", ".keras"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".pt")
    return path.with_name(name + ".pt")


def main(args: argparse.Namespace) -> int:
    from emorecog_stream.cli import UsageError
    from emorecog_stream.model.keras_v1 import KerasV1Error, save_converted

    src = Path(args.input)
    out = Path(args.output) if args.output else default_output(src)
    if out.resolve() == src.resolve():
        raise UsageError(f"output {out} would overwrite the input")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    try:
        ckpt = save_converted(src, out)
    except KerasV1Error as exc:
        raise UsageError(str(exc)) from None
    sizes = ckpt["sizes"]
    summary = {
        "input": str(src),
        "output": str(out),
        "model_id": ckpt["model_id"],
        "layout": ckpt["source"]["layout"],
        "keras_version": ckpt["source"]["keras_version"],
        "sha256": ckpt["source"]["sha256"],
        "parameters": ckpt["parameters"],
        "window": sizes["window"],
        "rois": sizes["rois"],
        "gru_units": [sizes["stream_c"]["gru_units"], sizes["stream_l"]["gru_units"]],
        "bytes": out.stat().st_size,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"converted {src} ({summary['layout']}, Keras {summary['keras_version']})")
        print(f"  -> {out} ({summary['bytes'] / 1e6:.1f} MB, {summary['parameters']:,} parameters)")
        print(f"  model id {summary['model_id']}; run it with: emorecog-stream run --model {out}")
    return 0
