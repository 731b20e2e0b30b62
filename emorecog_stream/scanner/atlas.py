"""The ROI atlas of a live session: a label image in the run's functional space.

The lab moves the Brainnetome labels (or any 1..N parcellation) into the participant's
functional space before the session with its own tools; the bridge takes that label image as
given and checks it hard at start, because a wrong atlas gives plausible-looking numbers that
mean nothing: a grid or affine that does not match the volumes is an error naming both, and a
label with no voxels is an error rather than a silent NaN column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emorecog_stream.core.streams import N_ROIS, roi_labels

#: Affines that differ by less than this (mm) describe the same grid (header float noise).
AFFINE_TOLERANCE_MM = 1e-3


class AtlasError(ValueError):
    """The atlas cannot be used: unreadable, wrong values, empty labels, or the wrong grid."""


@dataclass(frozen=True)
class Atlas:
    """A label image (0 = background, 1..n_labels = regions) with its grid and region names."""

    labels: np.ndarray  # (X, Y, Z) int32
    affine: np.ndarray  # (4, 4) voxel -> world mm
    names: tuple[str, ...]  # one per label, label 1 first
    source: str

    @property
    def n_labels(self) -> int:
        return len(self.names)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    def voxel_counts(self) -> np.ndarray:
        """Voxels per label, label 1 first."""
        return np.bincount(self.labels.ravel(), minlength=self.n_labels + 1)[1:]

    def check_grid(self, shape: tuple[int, ...], affine: np.ndarray, what: str) -> None:
        """Raise :class:`AtlasError` naming both grids unless ``what`` lies on the atlas's grid."""
        same_shape = tuple(shape[:3]) == self.shape
        same_affine = np.allclose(affine, self.affine, atol=AFFINE_TOLERANCE_MM, rtol=0)
        if same_shape and same_affine:
            return
        raise AtlasError(
            f"the atlas {self.source} is not on the grid of {what}: expected shape"
            f" {self.shape} and affine {_fmt_affine(self.affine)} (the atlas's), found shape"
            f" {tuple(shape[:3])} and affine {_fmt_affine(affine)}; resample the atlas into the"
            " run's functional space (nearest neighbour) before the session"
        )


def _fmt_affine(affine: np.ndarray) -> str:
    rows = np.asarray(affine, dtype=float)[:3]
    return "[" + "; ".join(" ".join(f"{v:.3g}" for v in row) for row in rows) + "]"


def read_label_table(path: str | Path, n_labels: int) -> tuple[str, ...]:
    """Names from a table with one ``index name`` pair per line (``#`` comments, blank lines).

    Extra columns after the name (colours, as some tools write) are ignored; every index
    1..n_labels must appear once.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasError(f"label table {p}: cannot read it ({exc})") from exc
    names: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.split("#", 1)[0].strip()
        if not stripped:
            continue
        parts = stripped.split(maxsplit=2)
        if len(parts) < 2 or not parts[0].isdigit():
            raise AtlasError(
                f"label table {p}, line {number}: expected 'index name', found {line.strip()!r}"
            )
        index = int(parts[0])
        if not 1 <= index <= n_labels:
            raise AtlasError(
                f"label table {p}, line {number}: expected an index in 1..{n_labels},"
                f" found {index}"
            )
        if index in names:
            raise AtlasError(f"label table {p}, line {number}: index {index} appears twice")
        names[index] = parts[1]
    missing = [i for i in range(1, n_labels + 1) if i not in names]
    if missing:
        raise AtlasError(
            f"label table {p}: expected names for labels 1..{n_labels}, missing"
            f" {_fmt_list(missing)}"
        )
    return tuple(names[i] for i in range(1, n_labels + 1))


def _fmt_list(values: list[int], limit: int = 12) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def load_atlas(
    path: str | Path, label_table: str | Path | None = None, n_labels: int = N_ROIS
) -> Atlas:
    """Read a label image (NIfTI, or anything nibabel reads) and check it for a live session."""
    import nibabel as nib

    p = Path(path)
    try:
        image = nib.load(str(p))
        raw = np.asanyarray(image.dataobj)
    except FileNotFoundError as exc:
        raise AtlasError(f"atlas {p}: no such file") from exc
    except Exception as exc:  # nibabel raises many types for a broken image
        raise AtlasError(f"atlas {p}: not a readable label image ({exc})") from exc
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise AtlasError(f"atlas {p}: expected a 3-D label image, found shape {raw.shape}")
    values = np.asarray(raw, dtype=np.float64)
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise AtlasError(
            f"atlas {p}: expected integer labels (0 background, 1..{n_labels}), found"
            " non-integer values; resample labels with nearest-neighbour interpolation"
        )
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > n_labels:
        raise AtlasError(
            f"atlas {p}: expected labels 0..{n_labels}, found values from {low} to {high}"
        )
    labels = values.astype(np.int32)
    names = (
        read_label_table(label_table, n_labels)
        if label_table is not None
        else tuple(roi_labels(n_labels))
    )
    atlas = Atlas(labels=labels, affine=np.asarray(image.affine, dtype=np.float64),
                  names=names, source=str(p))
    empty = [i + 1 for i, n in enumerate(atlas.voxel_counts()) if n == 0]
    if empty:
        raise AtlasError(
            f"atlas {p}: expected every label 1..{n_labels} to have voxels, labels"
            f" {_fmt_list(empty)} have none (a region outside the field of view?)"
        )
    return atlas
