"""Synthesis: denoisers across timesteps, DDIM sampling, the memorization audit, the ratio arithmetic,
settings validation and the on-site run end to end (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.networks.ukan_diffusion import UKANDenoiser
from common.synthesis.audit import (feature_distance, intensity_stats, memorization_audit, realism_verdict,
                                    save_sample_grid)
from common.synthesis.diffusion import MonaiUNetDenoiser, noise_scheduler, sample, train_generator
from common.synthesis.ratio import parse_ratio, synthetic_needed
from common.synthesis.settings import SynthesisSettings, synthesis_settings


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY = dict(pixels=16, base_channels=8, channel_mult=(1, 2, 2), kan_levels=1, unet_channels=(8, 16, 16),
            batch_size=4, train_steps=3, sample_steps=5, sample_batch=4, warmup_steps=1)


# ---------------------------------------------------------------------------------------------- denoisers

@pytest.mark.parametrize("num_classes", [None, 2])
def test_ukan_denoiser_output_shape_across_timesteps(num_classes):
    torch.manual_seed(0)
    model = UKANDenoiser(3, base_channels=8, channel_mult=(1, 2, 4), kan_levels=1, num_classes=num_classes).eval()
    x = torch.randn(2, 3, 16, 16)
    labels = None if num_classes is None else torch.tensor([1, 0])
    outputs = []
    for t in (0, 500, 999):
        out = model(x, torch.full((2,), t), labels)
        assert out.shape == x.shape and torch.isfinite(out).all()
        outputs.append(out)
    # A scalar timestep is broadcast over the batch.
    torch.testing.assert_close(model(x, torch.tensor(500), labels), outputs[1])
    if num_classes:
        # The class changes the prediction once the output layer is no longer zero.
        torch.nn.init.normal_(model.out_conv.weight, std=0.1)
        a = model(x, torch.full((2,), 500), torch.tensor([0, 0]))
        b = model(x, torch.full((2,), 500), torch.tensor([1, 1]))
        assert not torch.allclose(a, b)
        assert model(x, torch.full((2,), 500)).shape == x.shape  # labels left out: unconditional
    else:
        with pytest.raises(ValueError, match="unconditional"):
            model(x, torch.full((2,), 500), torch.tensor([1, 1]))


def test_ukan_denoiser_kan_stages_and_gradients():
    model = UKANDenoiser(4, base_channels=8, channel_mult=(1, 2, 2, 4), kan_levels=2)
    assert model.is_kan == [False, False, True, True]
    x = torch.randn(2, 4, 16, 16)
    model(x, torch.tensor([3, 700])).pow(2).mean().backward()
    kan_grads = [p.grad for n, p in model.named_parameters() if "spline_weight" in n]
    assert kan_grads and all(g is not None and torch.isfinite(g).all() for g in kan_grads)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 4, 12, 12), torch.tensor([1]))


@pytest.mark.parametrize("num_classes", [None, 2])
def test_monai_unet_baseline_output_shape(num_classes):
    model = MonaiUNetDenoiser(3, (8, 16, 16), num_classes).eval()
    x = torch.randn(2, 3, 16, 16)
    labels = None if num_classes is None else torch.tensor([0, 1])
    for t in (0, 500, 999):
        assert model(x, torch.full((2,), t), labels).shape == x.shape


# ---------------------------------------------------------------------------------------------- sampling

def test_ddim_sampling_shape_range_and_determinism():
    settings = SynthesisSettings(**TINY)
    images = np.random.default_rng(0).random((6, 3, 16, 16)).astype(np.float32)
    trained = train_generator(images, settings, seed=0)
    assert trained.steps == 3 and all(np.isfinite(trained.losses))
    a = sample(trained, 5, seed=7)
    b = sample(trained, 5, seed=7)
    c = sample(trained, 5, seed=8)
    assert a.shape == (5, 3, 16, 16) and a.dtype == np.float32
    assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_ddim_loop_recovers_the_image_with_an_oracle_denoiser():
    """With the exact noise predictor of a single image, DDIM (eta = 0) must land on that image:
    checks the timestep spacing and the update of our DDIM loop."""
    settings = SynthesisSettings(**TINY, objective="epsilon")
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    alphas = noise_scheduler(settings).alphas_cumprod

    class Oracle(torch.nn.Module):
        def forward(self, x, t, labels=None):
            a = alphas[t].reshape(-1, 1, 1, 1)
            return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = sample(Oracle(), 3, seed=0, settings=settings, image_shape=(3, 16, 16))
    np.testing.assert_allclose(out, np.broadcast_to((x0.numpy() + 1) / 2, out.shape), atol=1e-4)


def test_flow_sampling_with_the_exact_velocity_lands_on_the_data_point():
    """For one data point the rectified-flow path is straight, so Euler integration of the exact
    velocity x0 - eps (eps recovered from x_t) reaches x0 from any noise in any number of steps."""
    settings = SynthesisSettings(**TINY, objective="flow")
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    T = settings.num_train_timesteps

    class Oracle(torch.nn.Module):
        def forward(self, x, t, labels=None):
            s = (t.float() / T).reshape(-1, 1, 1, 1)
            eps = (x - (1 - s) * x0) / s
            return x0 - eps

    for steps in (1, 4):
        out = sample(Oracle(), 3, seed=0, settings=settings, image_shape=(3, 16, 16), steps=steps)
        np.testing.assert_allclose(out, np.broadcast_to((x0.numpy() + 1) / 2, out.shape), atol=1e-4)


def test_class_conditional_training_and_sampling():
    settings = SynthesisSettings(**TINY, generator="unet")
    images = np.random.default_rng(1).random((6, 4, 16, 16)).astype(np.float32)
    trained = train_generator(images, settings, seed=0, labels=np.array([0, 1, 0, 1, 0, 1]))
    assert trained.num_classes == 2
    assert sample(trained, 2, seed=0).shape == (2, 4, 16, 16)


# ---------------------------------------------------------------------------------------------- audit

def smooth_images(n: int, seed: int, size: int = 24) -> np.ndarray:
    """Independent 'patients': a few random Gaussian blobs on a noisy background, 3 channels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = np.full((size, size), 0.3)
        for _ in range(3):
            cy, cx = rng.uniform(4, size - 4, 2)
            r = rng.uniform(2, 6)
            img += rng.uniform(0.2, 0.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += rng.normal(0, 0.02, img.shape)
        out[i] = np.stack([img, img ** 2, np.sqrt(np.clip(img, 0, None))])
    return np.clip(out, 0, 1)


def test_audit_rejects_copies_and_near_copies_and_accepts_independent_images():
    train = smooth_images(40, seed=0)
    groups = np.repeat(np.arange(20), 2)  # two ROIs per case
    rng = np.random.default_rng(1)
    exact = train[[0, 5, 11]]
    near = np.clip(train[[2, 8, 30]] + rng.normal(0, 0.005, train[[2, 8, 30]].shape), 0, 1).astype(np.float32)
    shifted = np.roll(train[[3, 17]], 1, axis=-1)  # a copy moved by one pixel
    mirrored = train[[4, 21]][..., ::-1]  # a left-right mirrored copy
    independent = smooth_images(30, seed=99)
    candidates = np.concatenate([exact, near, shifted, mirrored, independent])
    audit = memorization_audit(candidates, train, groups, percentile=5.0, max_shift=2)
    copies = 3 + 3 + 2 + 2
    assert not audit["accepted"][:copies].any(), audit["distance"][:copies]
    np.testing.assert_array_equal(audit["nearest"][:3], [0, 5, 11])
    # About 5 % of genuinely new images fall below the 5th percentile by construction.
    assert audit["accepted"][copies:].mean() >= 0.8
    summary = audit["summary"]
    assert summary["rejected"] >= copies and summary["real_training_cases"] == 20
    assert summary["threshold"] > 0.01  # well above the near-copy noise
    json.dumps(summary)


def test_leave_one_case_out_keeps_repeated_slices_from_collapsing_the_threshold():
    train = smooth_images(10, seed=3)
    repeated = np.repeat(train, 3, axis=0)  # k = 3 identical ROIs per case (tiny hematomas)
    groups = np.repeat(np.arange(10), 3)
    audit = memorization_audit(smooth_images(4, seed=4), repeated, groups)
    assert audit["threshold"] > 0.01
    per_roi = memorization_audit(smooth_images(4, seed=4), repeated, groups=None)
    assert per_roi["threshold"] < 1e-6  # what a per-ROI leave-one-out would give


def test_feature_distance_and_stats(tmp_path):
    real = smooth_images(20, seed=5)
    same = smooth_images(20, seed=6)
    noise = np.random.default_rng(0).random((20, 3, 24, 24)).astype(np.float32)
    close = feature_distance(real, same, seed=0)
    far = feature_distance(real, noise, seed=0)
    assert far["real_vs_synthetic"] > 10 * abs(close["real_vs_synthetic"])
    assert feature_distance(real, same, seed=0) == close  # fixed network: reproducible
    stats = intensity_stats(real, ["brain", "blood", "subdural"])
    assert set(stats) == {"brain", "blood", "subdural"} and 0 <= stats["blood"]["mean"] <= 1
    save_sample_grid(tmp_path / "grid.png", real, same[:5], noise[:2], real[:2])
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_realism_gate_passes_same_distribution_and_fails_noise():
    real_he = smooth_images(24, seed=7)
    real_nhe = smooth_images(24, seed=8)
    same = smooth_images(24, seed=9)
    noise = np.random.default_rng(1).random((24, 3, 24, 24)).astype(np.float32)
    scale = feature_distance(real_he, real_nhe, seed=0)["real_vs_synthetic"]
    verdicts = {}
    for name, synthetic in (("same", same), ("noise", noise)):
        distance = feature_distance(real_he, synthetic, seed=0)
        distance["real_nhe_vs_real_he"] = scale
        verdicts[name] = realism_verdict(distance)
        # The threshold is the larger of the class distance and the halves' sampling noise.
        assert verdicts[name]["mmd2_threshold"] == pytest.approx(max(scale, distance["real_vs_real_halves_q95"]))
    assert verdicts["same"]["passed"] is True
    assert verdicts["noise"]["passed"] is False
    assert verdicts["noise"]["mmd2_synthetic"] > 5 * verdicts["noise"]["mmd2_threshold"]
    # Nothing measurable (too few ROIs): no verdict, and the samples are not judged.
    assert realism_verdict({"real_vs_synthetic": float("nan"), "real_vs_real_halves_q95": 0.1})["passed"] is None


# ---------------------------------------------------------------------------------------------- ratio

def test_ratio_arithmetic():
    assert synthetic_needed(20, 80, "1:2") == 20
    assert synthetic_needed(20, 80, "1:1") == 60
    assert synthetic_needed(20, 80, "none") == 0
    assert synthetic_needed(50, 50, "1:2") == 0  # already balanced
    assert synthetic_needed(40, 80, "1:2") == 0  # exactly at the ratio
    assert synthetic_needed(10, 45, "1:2") == 13  # 22.5 -> 23 HE
    assert synthetic_needed(0, 9, "1:3") == 3
    assert synthetic_needed(30, 90, " 1 : 3 ") == 0
    assert parse_ratio("NONE") is None and parse_ratio("1:2") == (1.0, 2.0)


@pytest.mark.parametrize("bad", ["2:1", "1:0", "0:2", "1-2", "half", "", "1:2:3", "-1:2"])
def test_bad_ratios_are_config_errors(bad):
    with pytest.raises(ConfigError, match="synthesis ratio"):
        synthetic_needed(10, 40, bad)


def test_settings_from_profile_validate_keys_and_values():
    settings = synthesis_settings({"name": "p", "synthesis": {"pixels": 64, "generator": "unet", "train_steps": 10}})
    assert (settings.pixels, settings.generator, settings.train_steps) == (64, "unet", 10)
    assert settings.with_overrides(ratio="1:1", generator=None).ratio == "1:1"
    with pytest.raises(ConfigError, match="unknown \\[synthesis\\] key 'pixel'"):
        synthesis_settings({"name": "p", "synthesis": {"pixel": 64}})
    with pytest.raises(ConfigError, match="generator"):
        synthesis_settings({"synthesis": {"generator": "gan"}})
    with pytest.raises(ConfigError, match="pixels"):
        synthesis_settings({"synthesis": {"pixels": 30}})
    with pytest.raises(ConfigError, match="synthesis ratio"):
        synthesis_settings({"synthesis": {"ratio": "3:1"}})
    with pytest.raises(ConfigError, match="train_steps"):
        synthesis_settings({"synthesis": {"train_steps": 1.5}})


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_shipped_profiles_have_valid_synthesis_sections(name):
    from common.config import load_profile

    profile = load_profile(name)
    assert "synthesis" in profile
    synthesis_settings(profile)


# ---------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_hemex_synth_end_to_end(tmp_path):
    from common.cli import main
    from common.phantoms.cohort import generate_cohort
    from common.synthesis.run import load_synthetic

    data = tmp_path / "data"
    generate_cohort("tiny", data, seed=0, workers=1)
    profile = tmp_path / "p.toml"
    profile.write_text('name = "t"\n[preprocess]\nspacing = [2.0, 2.0, 5.0]\n'
                       '[synthesis]\npixels = 16\nbase_channels = 8\nchannel_mult = [1, 2, 2]\ntrain_steps = 3\n'
                       'batch_size = 4\nsample_steps = 4\nratio = "1:1"\n', encoding="utf-8")
    centre = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    out = tmp_path / "out"
    assert main(["synth", "--data", str(data), "--center", centre, "--out", str(out), "--profile", str(profile),
                 "--threads", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "config.json", "quality.png", "synthetic_he.npz"]
    audit = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    memo = audit["memorization"]
    assert memo["kept"] <= memo["needed"] and memo["accepted"] + memo["rejected"] == memo["synthetic"]
    # The realism verdict follows its two numbers, and a failed verdict keeps nothing. (With 2 HE
    # cases the halves' noise floor is wide, so either verdict can occur here; the unit test above
    # checks that noise fails and a same-distribution set passes.)
    realism = audit["realism"]
    assert realism["gate"] is True
    assert realism["passed"] == (realism["mmd2_synthetic"] <= realism["mmd2_threshold"])
    assert (memo["kept"] == 0 and memo["shortfall"] == memo["needed"]) if not realism["passed"] else memo["kept"] > 0
    images, masks, meta = load_synthetic(out / "synthetic_he.npz")
    assert images.shape == (memo["kept"], 3, 16, 16) and masks.shape == (memo["kept"], 16, 16)
    assert meta["center"] == centre
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["seed"] == 0 and "torch" in config["versions"]
    assert main(["synth", "--data", str(data), "--center", centre, "--out", str(out), "--ratio", "3:1"]) == 2
    # No synthesis asked for: no generator is trained, the outputs say so.
    none = tmp_path / "none"
    assert main(["synth", "--data", str(data), "--center", centre, "--out", str(none), "--profile", str(profile),
                 "--ratio", "none"]) == 0
    audit = json.loads((none / "audit.json").read_text(encoding="utf-8"))
    assert audit["memorization"]["needed"] == 0 and audit["training"] is None
    assert load_synthetic(none / "synthetic_he.npz")[0].shape == (0, 3, 16, 16)


# ---------------------------------------------------------------------------------------------- cache

def test_generator_cache_reuses_same_inputs_and_retrains_changed_ones(tmp_path):
    from common.synthesis.run import CenterROIs, synthesize

    def rois(seed):
        images = smooth_images(12, seed=seed, size=16)
        masks = (images[:, 1] > 0.5).astype(np.uint8)
        labels = np.array([1] * 6 + [0] * 6)
        groups = np.array([f"c{i // 2}" for i in range(12)])  # 2 ROIs per case
        return CenterROIs(images, masks, labels, groups, n_he_cases=3, n_nhe_cases=3, skipped=[])

    settings = SynthesisSettings(**TINY, ratio="1:1", realism_gate=False)
    cache = tmp_path / "cache"
    first, _ = synthesize(rois(1), settings, seed=0, n_needed=4, log=lambda _m: None, cache_dir=cache)
    assert first.audit["training"]["cached"] is False and first.audit["training"]["steps"] == 3
    assert len(list(cache.glob("generator-*.safetensors"))) == 1
    logs = []
    again, extra = synthesize(rois(1), settings.with_overrides(sample_steps=2, oversample=2.0), seed=0, n_needed=4,
                              log=logs.append, cache_dir=cache)
    # Same ROIs, training settings and seed: nothing trains, only sampling settings changed.
    assert again.audit["training"]["cached"] is True and again.audit["timing"]["train_seconds"] == 0.0
    assert not any("training" in m for m in logs) and any("reusing" in m for m in logs)
    assert again.audit["training"]["final_loss"] == first.audit["training"]["final_loss"]
    for changed in (dict(data=rois(2), settings=settings, seed=0), dict(data=rois(1), settings=settings, seed=1),
                    dict(data=rois(1), settings=settings.with_overrides(learning_rate=1e-3), seed=0)):
        result, _ = synthesize(changed["data"], changed["settings"], seed=changed["seed"], n_needed=4,
                               log=lambda _m: None, cache_dir=cache)
        assert result.audit["training"]["cached"] is False
    assert len(list(cache.glob("generator-*.safetensors"))) == 4


def test_precision_recall_separate_fidelity_from_diversity():
    from common.synthesis.audit import precision_recall

    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    assert min(precision_recall(real, rng.normal(size=(200, 4)))) > 0.8  # same distribution
    collapsed = rng.normal(scale=0.05, size=(200, 4))  # all near the centre: faithful, not diverse
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95 and recall < 0.2
    far = rng.normal(loc=10.0, size=(200, 4))  # nowhere near the real data
    assert precision_recall(real, far) == (0.0, 0.0)
    assert np.isnan(precision_recall(real[:3], far)[0])


# ---------------------------------------------------------------------------------------------- mask conditioning

def test_sampling_masks_are_moved_site_shapes_reproducible_per_seed():
    from common.synthesis.shapes import SCALE, sampling_masks

    yy, xx = np.mgrid[0:32, 0:32]
    # Elongated ellipses pointing one way: a rotation or mirror is visible in the second moments.
    masks = np.stack([((yy - 16) / 4.0) ** 2 + ((xx - 16 - d) / 9.0) ** 2 <= 1 for d in (-1, 0, 1)]).astype(np.uint8)
    moved = sampling_masks(masks, 40, seed=3)
    assert moved.shape == (40, 32, 32) and moved.dtype == np.uint8 and set(np.unique(moved)) <= {0, 1}
    np.testing.assert_array_equal(moved, sampling_masks(masks, 40, seed=3))
    assert not np.array_equal(moved, sampling_masks(masks, 40, seed=4))
    area = moved.reshape(40, -1).sum(1) / masks.reshape(3, -1).sum(1).mean()
    assert area.min() >= (1 - SCALE) ** 2 - 0.1 and area.max() <= (1 + SCALE) ** 2 + 0.1
    assert area.std() > 0.05  # scaled, not only copied
    copies = sum(any(np.array_equal(m, real) for real in masks) for m in moved)
    assert copies <= 2  # rotated / scaled: almost never one patient's outline as it was
    # Every shape stays centred where the ROI centres its hematoma.
    centroid = np.array([[(yy * m).sum() / m.sum(), (xx * m).sum() / m.sum()] for m in moved])
    assert np.abs(centroid - 15.5).max() < 2.5
    with pytest.raises(ValueError, match="masks must be"):
        sampling_masks(masks[0], 4, seed=0)


def test_a_mask_conditioned_generator_draws_its_image_around_the_given_mask():
    """Planted data: the image is bright exactly where the mask is. After a short training the
    generated images must be brighter inside the given (new) masks than outside them, by a margin."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16]

    def discs(n):
        centres = rng.uniform(5, 11, (n, 2))
        radii = rng.uniform(2.5, 4.5, n)
        return np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r for (cy, cx), r in zip(centres, radii)]).astype(np.float32)

    masks = discs(24)
    images = np.clip(0.2 + 0.6 * masks[:, None] + rng.normal(0, 0.03, (24, 3, 16, 16)), 0, 1).astype(np.float32)
    settings = SynthesisSettings(**{**TINY, "train_steps": 150, "sample_steps": 10}, mask_condition=True,
                                 learning_rate=2e-3, ema_decay=0.9)
    trained = train_generator(np.concatenate([images, masks[:, None]], axis=1), settings, seed=0)
    assert trained.condition_channels == 1 and trained.image_shape == (3, 16, 16)
    given = discs(8)[:, None]
    out = sample(trained, 8, seed=1, conditions=given)
    assert out.shape == (8, 3, 16, 16)
    inside = (out.mean(1) * given[:, 0]).sum((1, 2)) / given[:, 0].sum((1, 2))
    outside = (out.mean(1) * (1 - given[:, 0])).sum((1, 2)) / (1 - given[:, 0]).sum((1, 2))
    assert (inside - outside).min() > 0.3  # planted contrast 0.6
    with pytest.raises(ValueError, match="mask-conditioned"):
        sample(trained, 8, seed=1)


def test_mask_condition_needs_the_mask_channel():
    with pytest.raises(ConfigError, match="mask_condition"):
        synthesis_settings({"name": "t", "synthesis": {"mask_condition": True, "with_mask": False}})


def test_a_mask_conditioned_site_keeps_its_shapes_and_its_cache(tmp_path):
    from common.synthesis.run import CenterROIs, synthesize

    images = smooth_images(12, seed=1, size=16)
    masks = (images[:, 1] > 0.5).astype(np.uint8)
    rois = CenterROIs(images, masks, np.array([1] * 6 + [0] * 6), np.array([f"c{i // 2}" for i in range(12)]),
                      n_he_cases=3, n_nhe_cases=3, skipped=[])
    settings = SynthesisSettings(**TINY, ratio="1:1", realism_gate=False, mask_condition=True)
    first, extra = synthesize(rois, settings, seed=0, n_needed=4, log=lambda _m: None, cache_dir=tmp_path)
    assert extra["candidates"].shape[1] == 3 and first.masks is not None
    # The kept masks are the site's HE shapes, moved: about their size, not generated noise.
    assert 0.3 < first.masks.mean() / masks[:6].mean() < 3
    again, _ = synthesize(rois, settings, seed=0, n_needed=4, log=lambda _m: None, cache_dir=tmp_path)
    assert again.audit["training"]["cached"] is True
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.masks, first.masks)


@pytest.mark.slow
def test_a_short_training_on_a_tiny_cohort_passes_the_realism_gate_and_noise_fails_it(tiny_cohort):
    """The CPU profile's approach (UKAN, rectified flow, class-conditional) trained briefly on the
    tiny cohort's ROIs (16 px, 400 steps): its samples sit closer to the real HE ROIs than the real
    NHE ROIs do (the gate), by a margin, while an untrained generator (pure noise through the
    sampler) is far beyond the gate."""
    from common.config import load_profile
    from common.synthesis.run import CenterROIs, generate, generator_inputs, load_center_rois

    profile = load_profile("cpu")
    settings = synthesis_settings(profile, pixels=16, train_steps=400)
    assert settings.generator == "ukan" and settings.conditional and settings.objective == "flow"
    windows = [tuple(w) for w in profile["preprocess"]["windows"]]
    parts = [load_center_rois(tiny_cohort, c, settings, windows, include_nhe=True)
             for c in ("center1", "center2", "center3", "center4", "center5")]
    rois = CenterROIs(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("images", "masks", "labels", "groups")),
                      n_he_cases=sum(p.n_he_cases for p in parts), n_nhe_cases=sum(p.n_nhe_cases for p in parts),
                      skipped=[])
    he = rois.labels == 1
    real_he, real_nhe = rois.images[he], rois.images[~he]
    class_distance = feature_distance(real_he, real_nhe, seed=0)["real_vs_synthetic"]
    trained = train_generator(generator_inputs(rois, settings), settings, seed=0, labels=rois.labels)
    untrained = train_generator(generator_inputs(rois, settings), settings.with_overrides(train_steps=1), seed=0,
                                labels=rois.labels)
    verdicts = {}
    for name, generator in (("trained", trained), ("noise", untrained)):
        samples = generate(generator, 64, seed=1, he_masks=rois.masks[he])[:, :3]
        distance = feature_distance(real_he, samples, seed=0)
        distance["real_nhe_vs_real_he"] = class_distance
        verdicts[name] = realism_verdict(distance)
    assert verdicts["trained"]["passed"] is True
    assert verdicts["trained"]["mmd2_synthetic"] < 0.75 * verdicts["trained"]["mmd2_threshold"]
    assert verdicts["noise"]["passed"] is False
    assert verdicts["noise"]["mmd2_synthetic"] > 3 * verdicts["noise"]["mmd2_threshold"]
