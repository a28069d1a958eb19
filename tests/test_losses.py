"""Training losses checked against hand computations, and the augmentations' physical invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.augment import augment, drop_modalities, random_rotations
from model.config import DistillConfig, ModalitySpec, TrainConfig
from model.losses import distillation_loss, hint_loss, soft_target_loss


def _softmax(logits: list[float], temperature: float) -> list[float]:
    exps = [math.exp(value / temperature) for value in logits]
    return [e / sum(exps) for e in exps]


def test_soft_target_loss_is_zero_when_student_equals_teacher() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    loss = soft_target_loss(logits, logits.clone(), temperature=4.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_soft_target_loss_equals_temperature_squared_times_kl_by_hand() -> None:
    temperature = 2.0
    student = [[1.0, 2.0], [0.0, -1.0]]
    teacher = [[3.0, 0.5], [0.5, 0.5]]
    # KL(p_t || p_s) = sum_k p_t[k] * (log p_t[k] - log p_s[k]), p = softmax(z / T);
    # "batchmean" averages over the windows, and the loss is scaled by T^2.
    kls = []
    for s_row, t_row in zip(student, teacher, strict=True):
        p_s, p_t = _softmax(s_row, temperature), _softmax(t_row, temperature)
        kls.append(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True)))
    expected = temperature**2 * sum(kls) / len(kls)

    loss = soft_target_loss(torch.tensor(student), torch.tensor(teacher), temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The first row to the digits: p_t = softmax([1.5, 0.25]) = [0.7773, 0.2227], p_s = softmax([0.5, 1.0]) =
    # [0.3775, 0.6225]; KL = 0.7773 ln(0.7773 / 0.3775) + 0.2227 ln(0.2227 / 0.6225) = 0.3324.
    assert kls[0] == pytest.approx(0.3324, abs=1e-4)


def test_soft_target_loss_is_asymmetric_kl_from_teacher() -> None:
    student, teacher = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[4.0, 0.0, 0.0]])
    forward = soft_target_loss(student, teacher, 1.0)
    backward = soft_target_loss(teacher, student, 1.0)
    expected = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean")
    assert forward.item() == pytest.approx(expected.item(), rel=1e-6)
    assert forward.item() != pytest.approx(backward.item(), rel=1e-3)


def test_hint_loss_with_identity_and_normalised_teacher_equals_mse() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 8, generator=generator)
    teacher = F.layer_norm(3 * torch.randn(2, 5, 8, generator=generator) + 1, (8,))
    expected = ((student - teacher) ** 2).mean()
    loss = hint_loss(student, teacher, nn.Identity())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_hint_loss_ignores_scale_and_offset_of_teacher_features() -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 8, generator=generator)
    teacher = torch.randn(2, 5, 8, generator=generator)
    plain = hint_loss(student, teacher, nn.Identity())
    rescaled = hint_loss(student, 10 * teacher - 4, nn.Identity())
    assert rescaled.item() == pytest.approx(plain.item(), rel=1e-4)


def test_hint_loss_projects_student_width_to_teacher_width() -> None:
    projection = nn.Linear(4, 8)
    loss = hint_loss(torch.randn(2, 5, 4), torch.randn(2, 5, 8), projection)
    loss.backward()
    assert projection.weight.grad is not None
    assert torch.isfinite(loss)


def test_distillation_loss_is_weighted_sum_of_parts() -> None:
    generator = torch.Generator().manual_seed(0)
    config = DistillConfig(hard_weight=0.3, soft_weight=0.7, temperature=2.0, hint_weight=0.25)
    student_logits = torch.randn(4, 3, generator=generator)
    teacher_logits = torch.randn(4, 3, generator=generator)
    labels = torch.tensor([0, 2, 1, 2])
    student_features = torch.randn(4, 5, 6, generator=generator)
    teacher_features = torch.randn(4, 5, 6, generator=generator)
    parts = distillation_loss(
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        labels=labels,
        student_features=student_features,
        teacher_features=teacher_features,
        projection=nn.Identity(),
        config=config,
        label_smoothing=0.1,
    )
    assert set(parts) == {"loss", "hard", "soft", "hint"}
    expected = 0.3 * parts["hard"] + 0.7 * parts["soft"] + 0.25 * parts["hint"]
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    hard = F.cross_entropy(student_logits, labels, label_smoothing=0.1)
    assert parts["hard"].item() == pytest.approx(hard.item(), rel=1e-6)
    assert parts["soft"].item() == pytest.approx(soft_target_loss(student_logits, teacher_logits, 2.0).item())
    assert parts["hint"].item() == pytest.approx(hint_loss(student_features, teacher_features, nn.Identity()).item())


def test_random_rotations_are_proper_rotations_within_max_angle() -> None:
    max_degrees = 30.0
    generator = torch.Generator().manual_seed(0)
    rotations = random_rotations(256, max_degrees, generator, torch.device("cpu")).double()
    assert rotations.shape == (256, 3, 3)
    eye = torch.eye(3, dtype=torch.float64).expand(256, 3, 3)
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(256, dtype=torch.float64), rtol=0, atol=1e-5)
    # The rotation angle from the trace: tr(R) = 1 + 2 cos(theta).
    cos = ((rotations.diagonal(dim1=1, dim2=2).sum(dim=1) - 1) / 2).clamp(-1, 1)
    angles = torch.rad2deg(torch.arccos(cos))
    assert angles.max().item() <= max_degrees + 1e-3
    assert angles.max().item() > max_degrees / 2  # the range is used, not just tiny angles


def test_random_rotations_with_zero_degrees_are_identity() -> None:
    rotations = random_rotations(8, 0.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    torch.testing.assert_close(rotations, torch.eye(3).expand(8, 3, 3))


def test_augment_rotation_preserves_vector_norms_and_rotates_modalities_together() -> None:
    specs = [
        ModalitySpec("accelerometer", 3, 50.0, rotatable=True),
        ModalitySpec("gyroscope", 6, 50.0, rotatable=True),  # two x/y/z triplets
        ModalitySpec("barometer", 1, 50.0),
    ]
    config = TrainConfig(rotation_degrees=45.0, scale_sd=0.0, jitter_sd=0.0, shift_seconds=0.0, speed_change=0.0)
    generator = torch.Generator().manual_seed(0)
    accelerometer = torch.randn(4, 50, 3, generator=generator)
    gyroscope = torch.cat([accelerometer, 2 * torch.randn(4, 50, 3, generator=generator)], dim=2)
    barometer = torch.randn(4, 50, 1, generator=generator)
    xs = [accelerometer, gyroscope, barometer]
    out = augment(xs, specs, [torch.ones(spec.channels) for spec in specs], config, generator)

    for before, after in zip(xs[:2], out[:2], strict=True):
        assert after.shape == before.shape
        norms_before = before.view(4, 50, -1, 3).norm(dim=-1)
        norms_after = after.view(4, 50, -1, 3).norm(dim=-1)
        torch.testing.assert_close(norms_after, norms_before, rtol=1e-5, atol=1e-5)
        assert (after - before).abs().max() > 1e-2  # it did rotate
    # One device rotation for all x/y/z modalities: equal inputs stay equal.
    torch.testing.assert_close(out[1][:, :, :3], out[0], rtol=1e-6, atol=1e-6)
    # A scalar modality is not rotated (and nothing else was enabled).
    torch.testing.assert_close(out[2], barometer, rtol=0, atol=0)


def test_augment_shift_moves_every_modality_by_same_seconds_repeating_edges() -> None:
    specs = [ModalitySpec("accelerometer", 3, 50.0), ModalitySpec("gyroscope", 3, 25.0)]
    config = TrainConfig(rotation_degrees=0.0, scale_sd=0.0, jitter_sd=0.0, shift_seconds=0.2, speed_change=0.0)
    # Each sample holds its own time in seconds, so a shift shows up as a constant offset.
    xs = [
        (torch.arange(50.0) / 50).view(1, 50, 1).expand(8, 50, 3),
        (torch.arange(25.0) / 25).view(1, 25, 1).expand(8, 25, 3),
    ]
    out = augment(xs, specs, [torch.ones(3), torch.ones(3)], config, torch.Generator().manual_seed(0))
    shifts = []
    for x, y, spec in zip(xs, out, specs, strict=True):
        delay = x[:, 10:-10] - y[:, 10:-10]  # away from the edges, which repeat a sample
        assert torch.allclose(delay, delay[:, :1], atol=1e-6)  # one shift per window
        assert delay.abs().max() <= config.shift_seconds + 0.5 / spec.sample_rate + 1e-6
        shifts.append(delay[:, 0, 0])
        # Edge samples are repeated, not wrapped around: time never decreases along a window.
        assert (y[:, 1:] >= y[:, :-1]).all()
    # Both modalities moved by the same time, up to rounding to each one's sample grid.
    assert torch.allclose(shifts[0], shifts[1], atol=0.5 / 50 + 0.5 / 25 + 1e-6)
    assert shifts[0].abs().max() > 0.05


def test_drop_modalities_never_drops_last_present_modality() -> None:
    present = torch.tensor([[True, False, False], [False, True, False], [False, False, True]]).repeat(20, 1)
    dropped = drop_modalities(present, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, present)


def test_drop_modalities_with_probability_one_drops_exactly_one_present_per_window() -> None:
    generator = torch.Generator().manual_seed(0)
    present = torch.rand(200, 4, generator=generator) < 0.7
    present[:, 0] |= present.sum(dim=1) < 2  # at least two present everywhere
    present[:, 1] |= present.sum(dim=1) < 2
    dropped = drop_modalities(present, 1.0, generator)
    assert (present.sum(dim=1) - dropped.sum(dim=1) == 1).all()
    assert not (dropped & ~present).any()  # only present modalities are hidden, none appear


def test_drop_modalities_with_probability_zero_keeps_everything() -> None:
    present = torch.ones(10, 3, dtype=torch.bool)
    assert torch.equal(drop_modalities(present, 0.0, torch.Generator().manual_seed(0)), present)


def test_drop_modalities_rate_matches_probability() -> None:
    present = torch.ones(4000, 2, dtype=torch.bool)
    dropped = drop_modalities(present, 0.25, torch.Generator().manual_seed(0))
    rate = (dropped.sum(dim=1) == 1).float().mean().item()
    assert rate == pytest.approx(0.25, abs=0.03)
    assert (dropped.sum(dim=1) >= 1).all()
