"""Checkpoint files of the streaming EmoRecog-Net, and :func:`load_model` for every model kind.

A checkpoint is a ``torch.save`` dict (loaded with ``weights_only=True``: no code runs on load):

``format``            ``"emorecog-net-stream"``
``format_version``    1
``config``            :class:`~emorecog_stream.model.net.NetConfig` as a dict
``state_dict``        weights plus the normalisation buffers (per-ROI mean/std of the baseline
                      deviations, HR/RR mean/std, deviation spreads)
``label_order``       ``["negative", "neutral", "positive"]``
``package_version``   the emorecog-stream version that wrote it
``training``          what it was trained on, the command, seed, split, epochs (free-form dict)
``metrics``           validation/test figures written by training (free-form dict)

``model_id`` is ``emorecog-net-stream:<package version>:<first 8 hex of a SHA-256 over the
config and the weights>``, so two files with the same weights get the same id.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emorecog_stream import __version__
from emorecog_stream.core.streams import CATEGORY_LABELS
from emorecog_stream.model.api import StreamingModel
from emorecog_stream.model.net import EmoRecogNet, NetConfig
from emorecog_stream.model.stepper import StreamingEmoRecogNet
from emorecog_stream.private_files import replace_private

FORMAT = "emorecog-net-stream"
FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "default.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what was wrong."""


class UnsafeCheckpointError(CheckpointError):
    """The file would import and call Python code while loading: refused, nothing of it ran."""


_EXPECTED = (
    "expected a PyTorch checkpoint of tensors and plain values (a .pt zip archive written by"
    " torch.save, as `emorecog-stream train` and `emorecog-stream convert` write)"
)


def _describe_file(path: Path) -> str:
    """What ``path`` looks like, in a few words, for an error message (reads its first bytes)."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):  # ValueError: a name not UTF-8
            return f"a damaged or cut-off zip archive ({size:,} bytes)"
        if names and all(n.endswith(".npy") for n in names):
            return f"a NumPy .npz archive of arrays {[n[:-4] for n in names[:5]]}"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return f"a PyTorch archive whose contents cannot be read ({size:,} bytes)"
        return f"a zip archive without a PyTorch data.pkl (it holds {names[:5]})"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return (
            "an HDF5 file (a Keras model? give it as keras-v1:PATH, or turn it into a .pt with"
            " `emorecog-stream convert`)"
        )
    if head.startswith(b"\x80"):
        return f"a bare pickle stream that is not a checkpoint ({size:,} bytes)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a character cut at the end of the 64 bytes is fine
        text = head[: exc.start].decode("utf-8") if exc.start >= len(head) - 3 else ""
    if text and "".join(text.split()).isprintable():
        return f"a text file starting with {text.strip().splitlines()[0][:40]!r}"
    return f"a binary file of {size:,} bytes starting with {head[:8].hex(' ')}"


def load_weights_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``, with errors that say what was expected and found.

    Why not torch's own messages: for a file that holds code (a pickle that imports and calls a
    function) torch suggests loading it again with ``weights_only=False``, which is exactly what
    would run that code on the lab machine. Here such a file is refused with
    :class:`UnsafeCheckpointError` naming the callable it asked for; any other unreadable file
    gets a :class:`CheckpointError` describing what the file is instead.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint {str(path)!r}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if wanted:
            raise UnsafeCheckpointError(
                f"model checkpoint {str(path)!r} refused: loading it would import and call"
                f" {wanted.group(1)!r}, i.e. run code stored in the file (nothing was run). "
                + _EXPECTED[0].upper()
                + _EXPECTED[1:]
                + "; re-save the weights alone (a state dict) from a copy you trust"
            ) from None
        raise CheckpointError(
            f"model checkpoint {str(path)!r}: {_EXPECTED}, found {_describe_file(path)}"
        ) from None
    except Exception:  # torch raises many types (KeyError, EOFError, RuntimeError) for junk
        raise CheckpointError(
            f"model checkpoint {str(path)!r}: {_EXPECTED}, found {_describe_file(path)}"
        ) from None


def weights_hash(net: EmoRecogNet) -> str:
    """SHA-256 over the config and every tensor of the state dict, in name order."""
    digest = hashlib.sha256(json.dumps(net.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
    return digest.hexdigest()


def model_id_for(net: EmoRecogNet, version: str) -> str:
    return f"{FORMAT}:{version}:{weights_hash(net)[:8]}"


def save_checkpoint(
    net: EmoRecogNet,
    path: str | Path,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Write ``net`` to ``path`` (float32 weights); returns its model id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float().clone() for k, v in net.state_dict().items()}
    checkpoint = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": net.config.to_dict(),
        "state_dict": state,
        "label_order": list(CATEGORY_LABELS),
        "package_version": __version__,
        "training": training or {},
        "metrics": metrics or {},
    }
    with replace_private(path) as f:  # owner-only: derived from participants' data
        torch.save(checkpoint, f)
    return model_id_for(net, __version__)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of any ``.pt`` file we write (ours or a converted Keras v1 model)."""
    path = Path(path)
    data = load_weights_file(path)
    if not isinstance(data, dict) or "format" not in data:
        raise CheckpointError(
            f"model checkpoint {str(path)!r}: expected a dict with a 'format' key"
            f" ({FORMAT!r} or 'keras-v1'), found {type(data).__name__}"
            + (f" with keys {sorted(data)[:8]}" if isinstance(data, dict) else "")
        )
    return data


def net_from_checkpoint(data: dict[str, Any], path: str | Path) -> EmoRecogNet:
    """Rebuild the network of one of our checkpoint dicts, checking every part."""
    if data.get("format") != FORMAT:
        raise CheckpointError(
            f"model checkpoint {str(path)!r}: format {data.get('format')!r}, expected {FORMAT!r}"
        )
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # a tensor cannot compare
        raise CheckpointError(
            f"model checkpoint {str(path)!r}: format_version {data.get('format_version')!r},"
            f" this version reads {FORMAT_VERSION}"
        )
    label_order = data.get("label_order", [])
    if not isinstance(label_order, (list, tuple)) or list(label_order) != list(CATEGORY_LABELS):
        raise CheckpointError(
            f"model checkpoint {str(path)!r}: label order {data.get('label_order')!r},"
            f" expected {list(CATEGORY_LABELS)}"
        )
    try:
        raw_config = dict(data["config"])
        try:
            json.dumps(raw_config)  # plain values only: the model id hashes the config as JSON
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"model checkpoint {str(path)!r}: config: expected plain numbers and strings,"
                f" found {exc}"
            ) from None
        config = NetConfig.from_dict(raw_config)
        with torch.device("meta"):  # shapes only: sizes read from the file allocate nothing
            expected = EmoRecogNet(config).state_dict()
        _check_shapes(path, expected, data["state_dict"])
        net = EmoRecogNet(config)
        net.load_state_dict(data["state_dict"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"model checkpoint {str(path)!r}: {exc}") from exc
    return net.eval()


def _check_shapes(path: str | Path, expected: dict[str, Any], state: Any) -> None:
    """Every tensor the config implies is in the file with its shape, before the network is
    built: a config of absurd widths would otherwise allocate them (the file holds no such
    weights)."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"model checkpoint {str(path)!r}: state_dict is a {type(state).__name__}, not a dict"
        )
    for name, tensor in expected.items():
        found = state.get(name)
        shape = tuple(found.shape) if isinstance(found, torch.Tensor) else None
        if shape != tuple(tensor.shape):
            raise CheckpointError(
                f"model checkpoint {str(path)!r}: size mismatch for tensor {name!r}: the stored"
                f" config implies shape {tuple(tensor.shape)}, the file holds "
                + ("none" if found is None else f"{type(found).__name__} {shape or ''}".strip())
            )


def load_model(path: str | Path | None = None) -> StreamingModel:
    """Load a model for the engine.

    * ``None``: the shipped default checkpoint (trained on synthetic data; see its model card).
    * a ``.pt`` file written by ``emorecog-stream train`` (format ``emorecog-net-stream``), or by
      ``emorecog-stream convert`` (format ``keras-v1``, handed to
      :func:`emorecog_stream.model.keras_v1.load_converted`).
    * ``"keras-v1:PATH"``: the published Keras v1.0 model from an ``.h5`` (or converted ``.pt``)
      file, via :func:`emorecog_stream.model.keras_v1.load_keras_v1_model`.
    """
    if isinstance(path, str) and path.startswith("keras-v1:"):
        from emorecog_stream.model import keras_v1

        return keras_v1.load_keras_v1_model(path[len("keras-v1:") :])
    path = DEFAULT_CHECKPOINT if path is None else Path(path)
    data = read_checkpoint(path)
    if data["format"] == "keras-v1":
        from emorecog_stream.model import keras_v1

        return keras_v1.load_converted(data, path)
    net = net_from_checkpoint(data, path)
    version = str(data.get("package_version", "?"))
    metadata = {k: data.get(k) for k in ("training", "metrics", "package_version")}
    metadata["path"] = str(path)
    return StreamingEmoRecogNet(net, model_id_for(net, version), metadata)
