"""Sensor-appropriate augmentation of raw windows and modality dropout, in torch on the batch's device.

Every transform is physically consistent across modalities: one random rotation of
the device rotates all x/y/z modalities together, and one time shift moves all
modalities by the same number of seconds (each at its own rate).
"""

from __future__ import annotations

import math

import torch

from model.config import ModalitySpec, TrainConfig


def random_rotations(batch: int, max_degrees: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Rotation matrices ``(B, 3, 3)`` about uniform random axes by angles up to ``max_degrees``."""
    axis = torch.randn(batch, 3, generator=generator, device=device)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-8)
    angle = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * math.radians(max_degrees)
    x, y, z = axis.unbind(1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(batch, 3, 3)
    eye = torch.eye(3, device=device).expand(batch, 3, 3)
    sin, cos = angle.sin()[:, None, None], angle.cos()[:, None, None]
    return eye + sin * cross + (1 - cos) * (cross @ cross)  # Rodrigues' formula


def resample(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x (B, T, C)`` at fractional sample ``positions (B, T)``, clamped to the window."""
    T = x.shape[1]
    positions = positions.clamp(0, T - 1)
    below = positions.floor().long().clamp(0, max(T - 2, 0))
    above = (below + 1).clamp(max=T - 1)
    weight = (positions - below)[:, :, None]
    channels = x.shape[2]
    low = x.gather(1, below[:, :, None].expand(-1, -1, channels))
    high = x.gather(1, above[:, :, None].expand(-1, -1, channels))
    return torch.lerp(low, high, weight)  # exact at whole positions, both ends included


def augment(
    xs: list[torch.Tensor],
    specs: list[ModalitySpec],
    channel_std: list[torch.Tensor],
    config: TrainConfig,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Rotate, scale, change the speed of, shift and jitter a batch of raw windows ``[(B, T_m, C_m), ...]``."""
    batch, device = xs[0].shape[0], xs[0].device
    rotation = random_rotations(batch, config.rotation_degrees, generator, device)
    shift_seconds = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * config.shift_seconds
    # People repeat an exercise faster or slower: play the window back at a random speed.
    speed = 1 + (torch.rand(batch, generator=generator, device=device) * 2 - 1) * config.speed_change
    out = []
    for x, spec, std in zip(xs, specs, channel_std, strict=True):
        _, T, C = x.shape
        if spec.rotatable:
            # (B, T, C) -> (B, T, C/3, 3): each triplet is a vector in the device frame.
            x = (x.view(batch, T, C // 3, 3) @ rotation[:, None].transpose(-1, -2)).view(batch, T, C)
        scale = 1 + config.scale_sd * torch.randn(batch, 1, 1, generator=generator, device=device)
        x = x * scale
        # Resample at shifted, stretched times (one speed and shift for all modalities),
        # repeating the edge samples rather than wrapping around.
        steps = torch.arange(T, device=device, dtype=x.dtype)[None, :]
        stretch = (steps - (T - 1) / 2) * (speed[:, None] - 1)  # exactly zero at speed 1
        x = resample(x, steps + stretch - shift_seconds[:, None] * spec.sample_rate)
        x = x + config.jitter_sd * std * torch.randn(x.shape, generator=generator, device=device)
        out.append(x)
    return out


def drop_modalities(present: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """With ``probability`` per window, hide one of its present modalities (never the last one)."""
    batch, modalities = present.shape
    if modalities < 2 or probability <= 0:
        return present
    drop = torch.rand(batch, generator=generator, device=present.device) < probability
    # Pick one present modality at random per window: random scores, absent ones excluded.
    scores = torch.rand(batch, modalities, generator=generator, device=present.device).masked_fill(~present, -1)
    victim = torch.nn.functional.one_hot(scores.argmax(dim=1), modalities).bool()
    can_drop = drop & (present.sum(dim=1) > 1)
    return present & ~(victim & can_drop[:, None])
