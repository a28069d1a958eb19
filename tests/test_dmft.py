"""The DMFT network: shapes, missing-modality masking, batch independence, config checks, fusion."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.config import DMFTConfig, ModalitySpec, student_config, teacher_config
from model.dmft import DMFT, SegmentTokenizer, TemporalMidFusion, count_parameters

from .conftest import BAROMETER, SEGMENTS, WINDOW_SECONDS, ConfigFactory, InputsFactory


@pytest.mark.parametrize("size", ["teacher", "student"])
def test_forward_returns_logits_features_and_head_shapes(
    size: str, config: DMFTConfig, teacher_sized_config: DMFTConfig, make_inputs: InputsFactory
) -> None:
    cfg = teacher_sized_config if size == "teacher" else config
    torch.manual_seed(0)
    network = DMFT(cfg).eval()
    batch = 4
    xs = make_inputs(cfg, batch)
    present = torch.ones(batch, len(cfg.modalities), dtype=torch.bool)
    with torch.no_grad():
        features = network.forward_features(xs, present)
        head = network.forward_head(features)
        logits = network(xs, present)
    assert features.shape == (batch, cfg.segments, cfg.dim)
    assert head.shape == (batch, len(cfg.class_names))
    assert logits.shape == (batch, len(cfg.class_names))
    torch.testing.assert_close(logits, head, rtol=0, atol=0)
    assert torch.isfinite(logits).all()


def test_tokenize_resamples_window_when_samples_not_multiple_of_segments() -> None:
    assert BAROMETER.samples(WINDOW_SECONDS) % SEGMENTS != 0
    tokenizer = SegmentTokenizer(BAROMETER, window_seconds=WINDOW_SECONDS, segments=SEGMENTS, dim=16, stem_channels=4)
    x = torch.randn(2, BAROMETER.samples(WINDOW_SECONDS), BAROMETER.channels)
    assert tokenizer(x).shape == (2, SEGMENTS, 16)


@pytest.mark.parametrize("absent", [0, 1, 2])
@pytest.mark.parametrize("replacement", ["random", "huge", "nan"])
def test_forward_ignores_values_of_absent_modality(
    absent: int, replacement: str, model: DMFT, config: DMFTConfig, make_inputs: InputsFactory
) -> None:
    xs = make_inputs(config, 3)
    present = torch.ones(3, len(config.modalities), dtype=torch.bool)
    present[:, absent] = False
    changed = list(xs)
    if replacement == "random":
        changed[absent] = torch.randn_like(xs[absent])
    elif replacement == "huge":
        changed[absent] = torch.full_like(xs[absent], 1e6)
    else:
        changed[absent] = torch.full_like(xs[absent], float("nan"))
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(changed, present), model.forward_features(xs, present), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(model(changed, present), model(xs, present), rtol=0, atol=1e-6)


@pytest.mark.parametrize("changed_index", [0, 1, 2])
def test_forward_depends_on_values_of_present_modality(
    changed_index: int, model: DMFT, config: DMFTConfig, make_inputs: InputsFactory
) -> None:
    xs = make_inputs(config, 3)
    present = torch.ones(3, len(config.modalities), dtype=torch.bool)
    changed = list(xs)
    changed[changed_index] = xs[changed_index] + torch.randn_like(xs[changed_index])
    with torch.no_grad():
        before, after = model(xs, present), model(changed, present)
    # Every window's prediction moves, not just on average.
    assert ((before - after).abs().amax(dim=1) > 1e-4).all()


def test_forward_absent_modality_only_changes_its_own_window(
    model: DMFT, config: DMFTConfig, make_inputs: InputsFactory
) -> None:
    xs = make_inputs(config, 2)
    present = torch.ones(2, len(config.modalities), dtype=torch.bool)
    present[0, 1] = False  # window 0 lost its gyroscope; window 1 has everything
    with torch.no_grad():
        batched = model(xs, present)
        alone = model([x[1:] for x in xs], present[1:])
        other_missing = present.clone()
        other_missing[0, :] = torch.tensor([False, False, True])
        batched_other = model(xs, other_missing)
    torch.testing.assert_close(batched[1:], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched_other[1:], alone, rtol=0, atol=1e-6)


def test_forward_window_with_missing_modality_matches_running_it_alone(
    model: DMFT, config: DMFTConfig, make_inputs: InputsFactory
) -> None:
    xs = make_inputs(config, 3)
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])
    with torch.no_grad():
        batched = model(xs, present)
        for window in range(3):
            alone = model([x[window : window + 1] for x in xs], present[window : window + 1])
            torch.testing.assert_close(batched[window : window + 1], alone, rtol=0, atol=1e-6)


def test_forward_every_nonempty_modality_subset_gives_finite_outputs(
    model: DMFT, config: DMFTConfig, make_inputs: InputsFactory
) -> None:
    count = len(config.modalities)
    subsets = [s for r in range(1, count + 1) for s in itertools.combinations(range(count), r)]
    assert len(subsets) == 2**count - 1
    xs = make_inputs(config, len(subsets))
    present = torch.zeros(len(subsets), count, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        present[row, list(subset)] = True
    with torch.no_grad():
        features = model.forward_features(xs, present)
        logits = model.forward_head(features)
    assert torch.isfinite(features).all()
    assert torch.isfinite(logits).all()


def test_forward_in_train_mode_backpropagates_to_every_parameter(
    config: DMFTConfig, make_inputs: InputsFactory
) -> None:
    torch.manual_seed(0)
    network = DMFT(config).train()
    xs = make_inputs(config, 4)
    present = torch.ones(4, len(config.modalities), dtype=torch.bool)
    network(xs, present).logsumexp(dim=1).sum().backward()
    missing = [name for name, p in network.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_config_rejects_duplicate_modality_names(make_config: ConfigFactory) -> None:
    twice = [ModalitySpec("accelerometer", 3, 50.0), ModalitySpec("accelerometer", 3, 25.0)]
    with pytest.raises(ValueError, match="duplicate modality names"):
        make_config(twice)


def test_config_rejects_dim_not_divisible_by_heads(make_config: ConfigFactory) -> None:
    with pytest.raises(ValueError, match="dim 18 is not divisible by heads 4"):
        make_config(dim=18, heads=4)


def test_config_rejects_fewer_samples_than_segments(make_config: ConfigFactory) -> None:
    slow = ModalitySpec("barometer", 1, 4.0)  # 4 samples in 1 s, but 5 segments
    with pytest.raises(ValueError, match="'barometer' has 4 samples per window, fewer than the 5 segments"):
        make_config([slow])


def test_config_rejects_no_modalities(make_config: ConfigFactory) -> None:
    with pytest.raises(ValueError, match="at least one modality"):
        make_config([])


def test_config_round_trips_through_dict(config: DMFTConfig) -> None:
    rebuilt = DMFTConfig.from_dict(config.to_dict())
    assert rebuilt == config
    assert all(isinstance(spec, ModalitySpec) for spec in rebuilt.modalities)


def test_teacher_preset_has_at_least_five_times_student_parameters() -> None:
    watch = [ModalitySpec("accelerometer", 3, 50.0, rotatable=True), ModalitySpec("gyroscope", 3, 50.0, rotatable=True)]
    classes = [f"exercise_{k}" for k in range(7)]
    teacher = DMFT(teacher_config(watch, classes))
    student = DMFT(student_config(watch, classes))
    assert count_parameters(teacher) >= 5 * count_parameters(student)
    assert student.config.dim < teacher.config.dim


@pytest.mark.parametrize("segments", [1, 2, 6])
def test_fusion_edge_segments_get_finite_output(segments: int) -> None:
    torch.manual_seed(0)
    fusion = TemporalMidFusion(16, heads=2, mlp_ratio=2.0, dropout=0.0).eval()
    x = torch.randn(3, 2, segments, 16)
    # Each window has a different set of present modalities, always at least one.
    present = torch.tensor([[True, True], [True, False], [False, True]])
    with torch.no_grad():
        fused = fusion(x, present)
    assert fused.shape == (3, segments, 16)
    assert torch.isfinite(fused).all()


def test_fusion_segment_reads_only_its_temporal_neighbourhood() -> None:
    torch.manual_seed(0)
    fusion = TemporalMidFusion(16, heads=2, mlp_ratio=2.0, dropout=0.0, radius=1).eval()
    x = torch.randn(2, 2, 6, 16)
    present = torch.tensor([[True, True], [False, True]])
    changed = x.clone()
    changed[:, :, 3:] = torch.randn(2, 2, 3, 16)  # beyond the neighbourhood of segments 0 and 1
    with torch.no_grad():
        before, after = fusion(x, present), fusion(changed, present)
    torch.testing.assert_close(after[:, :2], before[:, :2], rtol=0, atol=1e-6)
    assert (after[:, 2:] - before[:, 2:]).abs().amax() > 1e-4
