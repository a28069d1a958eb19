"""DMFT: a multi-modal spatial-temporal transformer with temporal mid-fusion.

Glossary of shapes: B batch, M modalities, S segments (tokens per modality), D width,
K classes, T_m samples of modality m in a window, C_m its channels.

The network, bottom-up:

1. **Unified representation.** Every modality window ``(B, T_m, C_m)``, at its own
   sample rate, is normalised with training-split statistics, smoothed by a small
   convolution, and cut into the same S equal-duration segments; each segment is
   projected to one D-wide token. A modality embedding and a temporal position
   embedding (shared by all modalities, since segment s covers the same time span in
   each) are added, so a 30 Hz and a 50 Hz sensor meet on one ``(M, S, D)`` grid.
2. **Missing modalities.** A modality absent from a window is replaced by a learned
   mask token and removed from every attention that a present modality reads, so its
   placeholder can never leak into the prediction. ``present`` is a ``(B, M)`` boolean
   tensor; True means the modality was observed for that window.
3. **Spatial-temporal blocks.** Factorised attention: *spatial* attention across the
   modalities at each segment (how the accelerometer relates to the gyroscope right
   now), then *temporal* attention across the segments of each modality, then an MLP.
4. **Temporal mid-fusion.** In the middle of the network, each segment's fused token
   is formed by a fusion query (the mean of the present modality tokens at that
   segment plus a learned fusion embedding) cross-attending to the tokens of every
   present modality in a short temporal neighbourhood (segments s-1, s, s+1). This is
   neither early fusion (concatenated raw channels) nor late fusion (averaged
   logits): each stream has been encoded on its own first, and the fusion can align
   events that one sensor sees slightly before another. Its output ``(B, S, D)`` is
   the mid-level representation that distillation matches (``forward_features``).
5. **Temporal encoder and head.** Transformer blocks over the fused sequence, mean
   pooled over segments, layer-normed and classified (``forward_head``).

Teacher and student are this one architecture with two configs (see ``config.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import DMFTConfig, ModalitySpec


class Normalizer(nn.Module):
    """Per-channel standardisation with statistics of the training split, kept as buffers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        # A constant channel must not turn into inf after division.
        self.std.copy_(std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SegmentTokenizer(nn.Module):
    """One modality's window to S tokens: normalise, smooth, one strided conv per segment."""

    def __init__(
        self, spec: ModalitySpec, *, window_seconds: float, segments: int, dim: int, stem_channels: int
    ) -> None:
        super().__init__()
        samples = spec.samples(window_seconds)
        # A window whose length is not a multiple of S is resampled to the next one,
        # so every modality can share the segment grid whatever its rate.
        self.segment_samples = math.ceil(samples / segments)
        self.resample_to = self.segment_samples * segments if samples % segments else 0
        self.normalizer = Normalizer(spec.channels)
        self.stem = nn.Sequential(nn.Conv1d(spec.channels, stem_channels, kernel_size=5, padding=2), nn.GELU())
        self.project = nn.Conv1d(stem_channels, dim, kernel_size=self.segment_samples, stride=self.segment_samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalizer(x).transpose(1, 2)  # (B, T, C) -> (B, C, T)
        if self.resample_to:
            x = F.interpolate(x, size=self.resample_to, mode="linear", align_corners=False)
        x = self.project(self.stem(x))  # (B, C, T) -> (B, D, S)
        return x.transpose(1, 2)  # (B, D, S) -> (B, S, D)


class Attention(nn.Module):
    """Multi-head attention; ``key_mask`` (B, N_kv) is True where a key may be attended."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        H = self.heads
        q = self.q(x).view(B, N, H, D // H).transpose(1, 2)  # (B, N, D) -> (B, H, N, D/H)
        k, v = self.kv(context).view(B, -1, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N_kv, D/H)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N_kv)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, N, D))  # (B, H, N, D/H) -> (B, N, D)


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialTemporalBlock(nn.Module):
    """Attention across modalities at each segment, then across segments of each modality, then an MLP."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_spatial = nn.LayerNorm(dim)
        self.spatial = Attention(dim, heads, dropout)
        self.norm_temporal = nn.LayerNorm(dim)
        self.temporal = Attention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        B, M, S, D = x.shape
        xs = x.transpose(1, 2).reshape(B * S, M, D)  # (B, M, S, D) -> (B*S, M, D)
        spatial_mask = present.repeat_interleave(S, dim=0)  # (B, M) -> (B*S, M)
        h = self.norm_spatial(xs)
        xs = xs + self.spatial(h, h, spatial_mask)
        xt = xs.view(B, S, M, D).transpose(1, 2).reshape(B * M, S, D)  # (B*S, M, D) -> (B*M, S, D)
        h = self.norm_temporal(xt)
        xt = xt + self.temporal(h, h)
        xt = xt + self.mlp(self.norm_mlp(xt))
        return xt.view(B, M, S, D)


class Block(nn.Module):
    """Pre-norm transformer block over one token sequence."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.norm_mlp(x))


class TemporalMidFusion(nn.Module):
    """Fuse M modality streams into one: each segment attends to all present modalities at s-r..s+r."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float, dropout: float, radius: int = 1) -> None:
        super().__init__()
        self.radius = radius
        self.fusion_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross = Attention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        B, M, S, D = x.shape
        width = 2 * self.radius + 1
        weights = present.to(x.dtype)[:, :, None, None]  # (B, M, 1, 1)
        query = (x * weights).sum(1) / weights.sum(1) + self.fusion_embed  # (B, M, S, D) -> (B, S, D)
        # Neighbourhood of each segment: (B, M, S, D) -> (B, M, S, width, D) -> (B*S, M*width, D).
        padded = F.pad(x, (0, 0, self.radius, self.radius))
        context = padded.unfold(2, width, 1).permute(0, 2, 1, 4, 3).reshape(B * S, M * width, D)
        # A key is valid where its modality is present and its segment lies inside the window.
        inside = F.pad(torch.ones(S, dtype=torch.bool, device=x.device), (self.radius, self.radius)).unfold(0, width, 1)
        context_mask = (present[:, None, :, None] & inside[None, :, None, :]).reshape(B * S, M * width)
        q = query.reshape(B * S, 1, D)
        fused = q + self.cross(self.norm_query(q), self.norm_context(context), context_mask)
        fused = fused + self.mlp(self.norm_mlp(fused))
        return fused.view(B, S, D)


class DMFT(nn.Module):
    """Distilled Mid-Fusion Transformer; ``forward(xs, present) -> logits (B, K)``.

    ``xs`` holds one raw window ``(B, T_m, C_m)`` per modality in config order (the
    values of an absent modality are ignored; zeros do), ``present`` is ``(B, M)`` bool.
    """

    def __init__(self, config: DMFTConfig) -> None:
        super().__init__()
        self.config = config
        M, S, D = len(config.modalities), config.segments, config.dim
        block_args = {"heads": config.heads, "mlp_ratio": config.mlp_ratio, "dropout": config.dropout}
        self.tokenizers = nn.ModuleList(
            SegmentTokenizer(
                spec, window_seconds=config.window_seconds, segments=S, dim=D, stem_channels=config.stem_channels
            )
            for spec in config.modalities
        )
        self.modality_embed = nn.Parameter(torch.zeros(M, D))
        self.position_embed = nn.Parameter(torch.zeros(S, D))
        self.mask_token = nn.Parameter(torch.zeros(M, D))
        self.spatial_temporal = nn.ModuleList(
            SpatialTemporalBlock(D, **block_args) for _ in range(config.spatial_temporal_blocks)
        )
        self.fusion = TemporalMidFusion(D, **block_args)
        self.temporal = nn.ModuleList(Block(D, **block_args) for _ in range(config.temporal_blocks))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, len(config.class_names))
        for parameter in (self.modality_embed, self.position_embed, self.mask_token):
            nn.init.trunc_normal_(parameter, std=0.02)

    def forward_features(self, xs: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """The fused mid-level representation ``(B, S, D)``."""
        tokens = torch.stack([tokenize(x) for tokenize, x in zip(self.tokenizers, xs, strict=True)], dim=1)
        # (B, M, S, D): absent modalities become their mask token.
        tokens = torch.where(present[:, :, None, None], tokens, self.mask_token[None, :, None, :])
        tokens = tokens + self.modality_embed[None, :, None, :] + self.position_embed[None, None, :, :]
        for block in self.spatial_temporal:
            tokens = block(tokens, present)
        return self.fusion(tokens, present)

    def forward_head(self, fused: torch.Tensor) -> torch.Tensor:
        for block in self.temporal:
            fused = block(fused)
        return self.head(self.norm(fused.mean(dim=1)))  # (B, S, D) -> (B, K)

    def forward(self, xs: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(xs, present))

    def set_normalization(self, means: list[torch.Tensor], stds: list[torch.Tensor]) -> None:
        for tokenizer, mean, std in zip(self.tokenizers, means, stds, strict=True):
            tokenizer.normalizer.set_stats(mean, std)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
