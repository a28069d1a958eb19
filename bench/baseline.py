"""The baseline a practitioner tries first: a small 1D-CNN over the concatenated channels.

Absent modalities are filled with their training mean (zeros after normalisation),
the usual imputation for a network without a notion of a missing input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModalitySpec
from model.dmft import Normalizer


class ConvBaseline(nn.Module):
    """Four conv layers with batch norm, global average pooling and a linear classifier."""

    def __init__(self, specs: list[ModalitySpec], *, window_seconds: float, classes: int, width: int = 64) -> None:
        super().__init__()
        # Modalities at different rates are resampled to the fastest one before concatenation.
        self.samples = max(spec.samples(window_seconds) for spec in specs)
        self.normalizers = nn.ModuleList(Normalizer(spec.channels) for spec in specs)
        channels = sum(spec.channels for spec in specs)

        def conv(inputs: int, outputs: int, kernel: int) -> list[nn.Module]:
            return [nn.Conv1d(inputs, outputs, kernel, padding=kernel // 2), nn.BatchNorm1d(outputs), nn.ReLU()]

        self.net = nn.Sequential(
            *conv(channels, width, 7),
            *conv(width, width, 5),
            *conv(width, 2 * width, 5),
            *conv(2 * width, 2 * width, 3),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(2 * width, classes),
        )

    def set_normalization(self, means: list[torch.Tensor], stds: list[torch.Tensor]) -> None:
        for normalizer, mean, std in zip(self.normalizers, means, stds, strict=True):
            normalizer.set_stats(mean, std)

    def forward(self, xs: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        columns = []
        for index, (x, normalizer) in enumerate(zip(xs, self.normalizers, strict=True)):
            x = normalizer(x).transpose(1, 2)  # (B, T, C) -> (B, C, T)
            if x.shape[2] != self.samples:
                x = F.interpolate(x, size=self.samples, mode="linear", align_corners=False)
            columns.append(x * present[:, index, None, None])
        return self.net(torch.cat(columns, dim=1))  # (B, sum C, T) -> (B, K)
