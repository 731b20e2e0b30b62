"""The streaming EmoRecog-Net: a causal two-stream CNN, a GRU and a physiology MLP (PyTorch).

Why this shape. The seed model (``shared/keras-v1-layout.md``) reads a 25-volume window with
'same'-padded convolutions (each output sees future volumes) and a GRU over the pooled window, so
every new volume means recomputing the window. This network keeps the seed's ingredients but makes
each of them causal, so one volume in gives one answer out and the state carries everything else:

* **Spatial stream**: a pointwise (kernel 1) layer over the 246 ROI values of the current volume.
* **Temporal stream**: a causal 1-D convolution over the last ``temporal_kernel`` volumes (padding
  on the left only: the volumes before the session started count as "no change from baseline").
* **GRU** (128 hidden units, as the seed's wide stream) over the concatenated streams.
* **Physiology MLP** over heart rate and respiration rate, each given twice (z-scored absolute
  value, and deviation from the session's running mean) with a valid flag: a hidden leaky-ReLU
  layer, then the fusion layer mixes it non-linearly with the GRU state. A missing rate never
  reaches the network as a number: it is replaced by learned values and its flag is 0.
* **Heads**: category logits (negative, neutral, positive) and intensity, ``4 * tanh`` so it stays
  on -4..+4 (the seed's 9-way level softmax is replaced by a regression, as the issue asks).

Leaky-ReLU slope 0.2 everywhere (Keras's ``leaky_relu``, which the seed uses). The ROI input is
each region's deviation from its causal running baseline (:mod:`emorecog_stream.model.features`),
then z-scored with per-ROI statistics of the training set; those statistics and the baseline
windows live in the module (buffers and config), so they travel in the checkpoint and are applied
identically offline and online.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emorecog_stream.core.streams import N_ROIS

LEAKY_SLOPE = 0.2
"""Keras's ``leaky_relu`` negative slope (the seed's activation), not PyTorch's 0.01."""


@dataclass(frozen=True)
class NetConfig:
    """Sizes of the network; stored in every checkpoint so it can be rebuilt exactly."""

    n_rois: int = N_ROIS
    spatial_channels: int = 64
    temporal_channels: int = 64
    temporal_kernel: int = 3
    hidden: int = 128
    physio_hidden: int = 16
    fusion_hidden: int = 64
    dropout: float = 0.5  # as the seed's Dropout(0.5)
    input_dropout: float = 0.5  # training only: whole ROIs dropped for a whole sequence
    physio_clip: float = 5.0  # z-scored rates are clipped to +-this (one wild value stays bounded)
    intensity_scale: float = 4.0
    roi_window: float = 60.0  # running ROI baseline time constant, volumes (features.py)
    rate_window: float = 60.0  # running HR/RR baseline time constant, volumes

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("dropout", "input_dropout"):
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"NetConfig.{f.name}: expected 0 <= p < 1, got {value}")
            elif not value > 0:
                raise ValueError(f"NetConfig.{f.name}: expected a positive value, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"checkpoint config has unknown keys {unknown}; this version knows {sorted(known)}"
            )
        return cls(**data)


class EmoRecogNet(nn.Module):
    """Whole-sequence forward pass (training and ``predict_sequence``); see the module docstring.

    ``forward(roi_dev (B, T, R), rates (B, T, 2), rate_dev (B, T, 2))``: ROI deviations from the
    running baseline, raw heart and respiration rates (NaN = missing) and their deviations from
    their running means (NaN where missing). Returns ``(category_logits (B, T, 3), intensity
    (B, T))``; the GRU starts from zeros at t = 0.
    """

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or NetConfig()
        self.spatial = nn.Linear(config.n_rois, config.spatial_channels)
        self.temporal = nn.Conv1d(config.n_rois, config.temporal_channels, config.temporal_kernel)
        self.gru = nn.GRU(
            config.spatial_channels + config.temporal_channels, config.hidden, batch_first=True
        )
        self.physio = nn.Linear(6, config.physio_hidden)
        self.fusion = nn.Linear(config.hidden + config.physio_hidden, config.fusion_hidden)
        self.category_head = nn.Linear(config.fusion_hidden, 3)
        self.intensity_head = nn.Linear(config.fusion_hidden, 1)
        self.dropout = nn.Dropout(config.dropout)
        self.input_dropout = nn.Dropout1d(config.input_dropout)
        # Learned stand-ins for a missing rate: z of HR, RR, then of their deviations.
        self.physio_fill = nn.Parameter(torch.zeros(4))
        # Normalisation statistics (set from the training data; identity until then).
        self.register_buffer("roi_mean", torch.zeros(config.n_rois))
        self.register_buffer("roi_std", torch.ones(config.n_rois))
        self.register_buffer("physio_mean", torch.tensor([70.0, 15.0]))
        self.register_buffer("physio_std", torch.tensor([10.0, 4.0]))
        self.register_buffer("physio_dev_std", torch.tensor([3.0, 1.0]))

    def set_normalisation(
        self,
        roi_mean: torch.Tensor,
        roi_std: torch.Tensor,
        physio_mean: torch.Tensor,
        physio_std: torch.Tensor,
        physio_dev_std: torch.Tensor,
    ) -> None:
        """Install training-set statistics; a zero spread is replaced by 1 (constant input)."""

        def spread(x: torch.Tensor) -> torch.Tensor:
            return torch.where(x > 1e-6, x, torch.ones_like(x))

        with torch.no_grad():
            self.roi_mean.copy_(roi_mean)
            self.roi_std.copy_(spread(roi_std))
            self.physio_mean.copy_(physio_mean)
            self.physio_std.copy_(spread(physio_std))
            self.physio_dev_std.copy_(spread(physio_dev_std))

    def physio_features(self, rates: torch.Tensor, rate_dev: torch.Tensor) -> torch.Tensor:
        """(…, 6): z of HR, RR, of their deviations (learned fill where missing), valid flags."""
        valid = torch.isfinite(rates)
        clip = self.config.physio_clip
        safe = torch.where(valid, rates, self.physio_mean)
        z = ((safe - self.physio_mean) / self.physio_std).clamp(-clip, clip)
        safe_dev = torch.where(valid, rate_dev, torch.zeros_like(rate_dev))
        zd = (safe_dev / self.physio_dev_std).clamp(-clip, clip)
        both = torch.cat([z, zd], dim=-1)
        both = torch.where(
            torch.cat([valid, valid], dim=-1), both, self.physio_fill.expand_as(both)
        )
        return torch.cat([both, valid.to(both.dtype)], dim=-1)

    def forward(
        self, roi_dev: torch.Tensor, rates: torch.Tensor, rate_dev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slope = LEAKY_SLOPE
        # Zero padding before the session is in deviation units (no change from the baseline).
        k = self.config.temporal_kernel
        padded = (F.pad(roi_dev, (0, 0, k - 1, 0)) - self.roi_mean) / self.roi_std  # (B, T+k-1, R)
        if self.training and self.config.input_dropout > 0:
            # Dropout1d zeroes whole channels (ROIs) over time, scaling the rest up
            padded = self.input_dropout(padded.transpose(1, 2)).transpose(1, 2)
        spatial = F.leaky_relu(self.spatial(padded[:, k - 1 :]), slope)
        temporal = F.leaky_relu(self.temporal(padded.transpose(1, 2)), slope).transpose(1, 2)
        features = self.dropout(torch.cat([spatial, temporal], dim=-1))
        hidden, _ = self.gru(features)
        p = F.leaky_relu(self.physio(self.physio_features(rates, rate_dev)), slope)
        fused = F.leaky_relu(self.fusion(torch.cat([hidden, p], dim=-1)), slope)
        fused = self.dropout(fused)
        logits = self.category_head(fused)
        intensity = self.config.intensity_scale * torch.tanh(self.intensity_head(fused)[..., 0])
        return logits, intensity


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
