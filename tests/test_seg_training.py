"""Segmentation training: patches, loss, training call, inference checks, checkpoints, train-seg.

Fast tests use small in-memory volumes; the tests marked slow train on the tiny synthetic
cohort (conftest's session fixture) and run `hemex train-seg` end to end.
"""

from __future__ import annotations

import dataclasses

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from common.cli import main as hemex
from common.config import load_profile
from common.data.preprocess import AIR_HU, DEFAULT_WINDOWS, Geometry, Sample
from common.errors import ConfigError, DataError
from common.networks import create_model
from common.inference.segmentation import check_volume, predict_mask
from common.training.checkpoint import architecture, build_model, load_checkpoint, save_checkpoint
from common.training.segmentation import train_segmentation
from common.training.settings import SegmentationSettings
from common.training.central import validate_centers
from common.training.losses import DeepSupervisionDiceCE, deep_supervision_weights, proximal_term
from common.training.patches import PatchSampler
from common.training.segmentation import uses_bf16
from common.metrics.segmentation import segmentation_metrics
from common.inference.segmentation import segment
from common.inference.postprocess import keep_blood_density, keep_main_lesion

# Small networks keep the fast tests fast; both take sizes divisible by 2 in z and 4 in-plane.
TINY_UNET = dict(channels=(4, 8, 16), strides=((1, 2, 2), (2, 2, 2)), num_res_units=1)
TINY_UMAMBA = dict(features=(4, 8, 16), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)), n_blocks_per_stage=1,
                   n_blocks_decoder=1)
PATCH = (8, 32, 32)

# The slow test's CPU-profile-sized U-Mamba after 120 steps: mean Dice on the 10 held-out cases
# 0.73 on one machine and 0.46 on another (AMD EPYC, 1 thread): short training on 30 cases is
# chaotic across platforms, and a missed 1-3 mL lesion scores 0. Thresholding blood density
# (50-100 HU, main lesion kept) scores 0.10 and predicting nothing 0; 0.3 and a 0.15 lead over
# that threshold prove the model learned the hematoma, with room for platform noise.
MIN_EXTERNAL_DICE = 0.3
MIN_LEAD_OVER_THRESHOLD = 0.15


def blob_sample(case_id: str, seed: int, shape=(12, 40, 40), center="synthetic") -> Sample:
    """A head-like HU volume (brain 30 HU in air) holding one bright 65 HU blob, and its mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    head = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (0.45 * shape[1]) ** 2
    hu[head] = 30.0
    c = [rng.integers(s // 4, 3 * s // 4) for s in shape]
    r = rng.uniform(2.5, 4.5)
    blob = ((z - c[0]) * 2) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2
    hu[blob] = 65.0
    hu += rng.normal(0, 3, shape).astype(np.float32)
    ref = sitk.GetImageFromArray(hu)
    ref.SetSpacing((2.0, 2.0, 5.0))
    geometry = Geometry.of(ref)
    return Sample(case_id, center, DEFAULT_WINDOWS, hu, blob.astype(np.uint8), (2.0, 2.0, 5.0), geometry,
                  geometry)


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded torch: small tensors gain little from a second thread, and on a busy
    2-core machine thread hand-offs made the tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def blobs() -> list[Sample]:
    return [blob_sample(f"b{i}", i) for i in range(6)]


def tiny_model(name="unet", **extra):
    torch.manual_seed(0)
    return create_model(name, 3, 2, **(TINY_UNET if name == "unet" else TINY_UMAMBA), **extra)


# --- building blocks ---------------------------------------------------------------------


def test_deep_supervision_weights_halve_and_sum_to_one():
    w = deep_supervision_weights(4)
    assert sum(w) == pytest.approx(1.0)
    assert all(a == pytest.approx(2 * b) for a, b in zip(w, w[1:]))


def test_patch_sampler_oversamples_foreground(blobs):
    rng = np.random.default_rng(0)
    always = PatchSampler(blobs, (4, 8, 8), 1.0, rng)
    assert all(always.draw()[1].any() for _ in range(50))
    hu, label = PatchSampler(blobs, (4, 8, 8), 0.0, rng).batch(3)
    assert hu.shape == (3, 1, 4, 8, 8) and label.shape == (3, 1, 4, 8, 8)


def test_patch_sampler_centres_hard_negatives_on_blood_dense_tissue_outside_the_lesion(blobs):
    samples = []
    for sample in blobs:
        hu = sample.hu.copy()
        hu[:, 5, 8:30] = 58.0  # a dense strand (falx-like) away from the blob
        hu[sample.mask > 0] = 65.0
        samples.append(dataclasses.replace(sample, hu=hu))
    sampler = PatchSampler(samples, (4, 8, 8), 0.0, np.random.default_rng(0), hard_negative_fraction=1.0)
    for _ in range(40):
        hu, label = sampler.draw()
        centre = hu[0, 2, 4, 4]  # the centred voxel (patches are clamped only at the volume's border)
        assert (hu[0] >= 50).any() and not label[0, 2, 4, 4]
        assert centre >= 50 or hu[0, :, 3:6, 3:6].max() >= 50
    with pytest.raises(ValueError, match="hard_negative_fraction"):
        PatchSampler(samples, (4, 8, 8), 0.6, np.random.default_rng(0), hard_negative_fraction=0.6)


def test_patch_sampler_pads_volumes_smaller_than_the_patch(blobs):
    hu, label = PatchSampler(blobs[:1], (16, 48, 48), 0.5, np.random.default_rng(0)).draw()
    assert hu.shape == (1, 16, 48, 48) and label.shape == (1, 16, 48, 48)
    assert hu.min() == AIR_HU  # padded with air


def test_loss_handles_deep_supervision_levels():
    target = torch.zeros(1, 1, 8, 16, 16, dtype=torch.long)
    target[..., 2:5, 4:9, 4:9] = 1
    outputs = [torch.randn(1, 2, 8, 16, 16, requires_grad=True), torch.randn(1, 2, 8, 8, 8, requires_grad=True)]
    loss = DeepSupervisionDiceCE()(outputs, target)
    loss.backward()
    assert torch.isfinite(loss) and all(o.grad is not None for o in outputs)


def test_proximal_term_is_zero_at_the_global_weights_and_grows_away_from_them():
    model = tiny_model()
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert proximal_term(model, anchor, 1.0).item() == 0.0
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert proximal_term(model, anchor, 1.0).item() > 0.0


def test_keep_main_lesion_keeps_satellites_and_drops_far_blobs():
    mask = np.zeros((10, 40, 40), np.uint8)
    mask[4:7, 10:20, 10:20] = 1  # main hematoma
    mask[5, 12:14, 23:25] = 1  # satellite 4 voxels (8 mm) to its side
    mask[5, 35:37, 35:37] = 1  # blob ~45 mm away
    kept = keep_main_lesion(mask, (2.0, 2.0, 5.0), 20.0)
    assert kept[5, 12, 23] == 1 and kept[5, 35, 35] == 0 and kept[5, 15, 15] == 1
    assert np.array_equal(keep_main_lesion(mask, (2.0, 2.0, 5.0), 0.0), mask)
    assert not keep_main_lesion(np.zeros_like(mask), (2.0, 2.0, 5.0), 20.0).any()


def test_components_that_cannot_be_acute_blood_are_dropped_before_the_main_lesion_is_chosen():
    hu = np.full((10, 40, 40), 30.0, np.float32)
    mask = np.zeros(hu.shape, np.uint8)
    mask[4:7, 10:16, 10:16] = 1
    hu[4:7, 10:16, 10:16] = 60.0  # a 108-voxel hematoma
    mask[2:8, 25:35, 25:35] = 1
    hu[2:8, 25:35, 25:35] = -80.0  # a larger fat / air-cell false positive
    mask[4:6, 30:36, 5:11] = 1
    hu[4:6, 30:36, 5:11] = 400.0  # bone partial volume at the skull
    kept = keep_blood_density(mask, hu)
    assert kept.sum() == 108 and kept[5, 12, 12] == 1
    assert not keep_blood_density(np.zeros_like(mask), hu).any()

    class Logits(torch.nn.Module):  # a "model" whose foreground logit is the given mask
        def forward(self, x):
            return torch.cat([torch.zeros_like(x[:, :1]), (x[:, :1] * 20 - 10)], dim=1)

    image = mask[None].astype(np.float32)
    without_hu, _ = segment(Logits(), image, (10, 40, 40), spacing=(2.0, 2.0, 5.0), satellite_mm=20.0)
    assert without_hu[5, 30, 30] == 1 and without_hu[5, 12, 12] == 0  # the largest blob wins, wrongly
    with_hu, _ = segment(Logits(), image, (10, 40, 40), spacing=(2.0, 2.0, 5.0), satellite_mm=20.0, hu=hu)
    assert np.array_equal(with_hu, kept)


def test_settings_reject_bad_profile_values():
    with pytest.raises(ConfigError, match="unknown \\[segmentation\\] key"):
        SegmentationSettings.from_profile({"name": "x", "segmentation": {"epoch": 3}})
    with pytest.raises(ConfigError, match="patch_size"):
        SegmentationSettings.from_profile({"segmentation": {"patch_size": [8, 0, 8]}})
    with pytest.raises(ConfigError, match="optimizer"):
        SegmentationSettings.from_profile({"segmentation": {"optimizer": "adam"}})
    picked = SegmentationSettings.from_profile(
        {"segmentation": {"model": "umamba-bot", "models": {"unet": {"dropout": 0.1}}}}, model="unet")
    assert picked.model == "unet" and picked.model_overrides == {"dropout": 0.1}


# --- training call ---------------------------------------------------------------------


def test_training_is_deterministic_and_reports_metrics(blobs):
    runs = []
    for _ in range(2):
        model = tiny_model()
        result = train_segmentation(model, blobs[:4], epochs=2, steps_per_epoch=2, patch_size=PATCH, batch_size=2,
                                    seed=3, val_samples=blobs[4:5])
        runs.append(result)
    a, b = runs
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    assert a.metrics["num_examples"] == 4 and a.metrics["steps"] == 4
    assert 0.0 <= a.metrics["val_dice"] <= 1.0 and a.best_epoch in (1, 2)


def test_best_state_is_the_best_validated_epoch_and_is_restored(blobs):
    model = tiny_model()
    result = train_segmentation(model, blobs[:4], epochs=3, steps_per_epoch=1, patch_size=PATCH, seed=0,
                                val_samples=blobs[4:5])
    best = max(r["val_dice"] for r in result.history)
    assert result.metrics["val_dice"] == best
    assert result.history[result.best_epoch - 1]["val_dice"] == best
    assert all(torch.equal(v, result.best_state[k]) for k, v in model.state_dict().items())


def test_a_wall_clock_budget_stops_training_after_the_epoch_that_spends_it(blobs):
    model = tiny_model()
    result = train_segmentation(model, blobs[:4], epochs=50, steps_per_epoch=1, patch_size=PATCH, seed=0,
                                val_samples=blobs[4:5], val_every=10, max_seconds=1e-9)
    assert len(result.history) == 1 and result.metrics["epochs"] == 1.0
    assert np.isfinite(result.history[0]["val_dice"])  # the last epoch is validated


def test_bf16_autocast_trains_fp32_weights(blobs):
    model = tiny_model("umamba-bot")
    result = train_segmentation(model, blobs[:4], epochs=1, steps_per_epoch=2, patch_size=PATCH, seed=0,
                                precision="bf16")
    assert np.isfinite(result.metrics["train_loss"])
    assert all(v.dtype == torch.float32 for v in result.best_state.values() if v.is_floating_point())
    assert uses_bf16("fp32", "cpu") is False and uses_bf16("bf16", "cpu") is True
    assert uses_bf16("auto", "cpu") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    with pytest.raises(ValueError, match="precision 'fp16'"):
        uses_bf16("fp16", "cpu")


def test_fedprox_keeps_weights_near_the_global_model(blobs):
    def drift(mu: float) -> float:
        model = tiny_model()
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        train_segmentation(model, blobs, epochs=1, steps_per_epoch=4, patch_size=PATCH, seed=0, lr=1e-2,
                           proximal_mu=mu, global_params=start, augment=False)
        return sum((p.detach() - start[k]).pow(2).sum().item() for k, p in model.named_parameters())

    assert drift(100.0) < drift(0.0)


def test_umamba_trains_with_deep_supervision(blobs):
    model = tiny_model("umamba-bot")
    result = train_segmentation(model, blobs[:2], epochs=1, steps_per_epoch=1, patch_size=PATCH, seed=0)
    assert np.isfinite(result.metrics["train_loss"])


def test_training_rejects_a_patch_the_network_cannot_take(blobs):
    with pytest.raises(ValueError, match="multiple"):
        train_segmentation(tiny_model(), blobs, epochs=1, steps_per_epoch=1, patch_size=(5, 32, 32))


# --- inference input checks -----------------------------------------------------------------


def test_prediction_has_the_volume_shape_for_any_size(blobs):
    model = tiny_model()
    odd = blobs[0].image[:, :11, :37, :29]
    assert predict_mask(model, odd, PATCH).shape == (11, 37, 29)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((12, 40, 40), np.float32), "expected a \\(channels, z, y, x\\) volume"),
        (np.zeros((1, 3, 12, 40, 40), np.float32), "expected a \\(channels, z, y, x\\) volume"),
        (np.zeros((2, 12, 40, 40), np.float32), "expected 3 channels"),
        (np.zeros((3, 0, 40, 40), np.float32), "empty volume"),
        (np.full((3, 12, 40, 40), np.nan, np.float32), "NaN or infinite"),
    ],
)
def test_bad_inputs_get_clear_errors(image, message):
    with pytest.raises(DataError, match=message) as err:
        predict_mask(tiny_model(), image, PATCH, name="case-x")
    assert str(err.value).startswith("case-x: ") and "\n" not in str(err.value)


def test_training_checks_its_samples(blobs):
    broken = blob_sample("bad", 0)
    broken.hu[0, 0, 0] = np.inf
    with pytest.raises(DataError, match="synthetic/bad: volume holds NaN"):
        train_segmentation(tiny_model(), [broken], epochs=1, steps_per_epoch=1, patch_size=PATCH)
    assert check_volume(blobs[0].image, 3) is None


# --- checkpoints -------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path, blobs):
    arch = architecture("unet", 3, 2, TINY_UNET)
    model = build_model(arch)
    save_checkpoint(tmp_path, model.state_dict(), arch, {"seed": 0})
    loaded, record = load_checkpoint(tmp_path, expected=architecture("unet", 3, 2, TINY_UNET))
    assert record["seed"] == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert np.array_equal(predict_mask(model, blobs[0].image, PATCH), predict_mask(loaded, blobs[0].image, PATCH))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_loading_another_architecture_or_size_names_the_difference(tmp_path):
    arch = architecture("unet", 3, 2, TINY_UNET)
    save_checkpoint(tmp_path, build_model(arch).state_dict(), arch)
    with pytest.raises(ConfigError, match="model: 'unet' -> 'umamba-bot'"):
        load_checkpoint(tmp_path, expected=architecture("umamba-bot", 3, 2, TINY_UMAMBA))
    wider = dict(TINY_UNET, channels=(8, 16, 32))
    with pytest.raises(ConfigError, match="channels: \\[4, 8, 16\\] -> \\[8, 16, 32\\]"):
        load_checkpoint(tmp_path, expected=architecture("unet", 3, 2, wider))


def test_runtime_settings_do_not_block_loading(tmp_path):
    arch = architecture("umamba-bot", 3, 2, dict(TINY_UMAMBA, mamba_backend="auto"))
    save_checkpoint(tmp_path, build_model(arch).state_dict(), arch)
    cpu_site = architecture("umamba-bot", 3, 2, dict(TINY_UMAMBA, mamba_backend="mambapy", deep_supervision=False))
    model, _ = load_checkpoint(tmp_path, expected=cpu_site)
    assert model.deep_supervision is False


def test_weights_that_do_not_fit_their_record_are_reported(tmp_path):
    arch = architecture("unet", 3, 2, TINY_UNET)
    save_checkpoint(tmp_path, build_model(architecture("unet", 3, 2, dict(TINY_UNET, channels=(8, 16, 32))))
                    .state_dict(), arch)
    with pytest.raises(DataError, match="do not fit the recorded architecture"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not a hemex segmentation checkpoint"):
        load_checkpoint(tmp_path)


# --- train-seg settings errors -----------------------------------------------------------------


def test_centre_lists_are_validated(cohort):
    with pytest.raises(ConfigError, match="unknown centre\\(s\\) C"):
        validate_centers(cohort, ("A", "C"), ("B",))
    with pytest.raises(ConfigError, match="A are in both"):
        validate_centers(cohort, ("A",), ("A", "B"))
    validate_centers(cohort, ("A",), ("B",))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train-centers", "A,Z", "--test-centers", "B"], "unknown centre(s) Z"),
        (["--train-centers", "A", "--test-centers", "A"], "in both --train-centers and --test-centers"),
        (["--train-centers", "A", "--test-centers", "B", "--model", "vnet"], "unknown model 'vnet'"),
        (["--train-centers", " , ", "--test-centers", "B"], "--train-centers is empty; available centres: A, B"),
    ],
)
def test_train_seg_bad_settings_are_one_line_errors(cohort, tmp_path, capsys, extra, message):
    code = hemex(["train-seg", "--data", str(cohort), "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# --- on the tiny synthetic cohort (slow) ---------------------------------------------------------


# `tiny_cohort` (the built-in tiny cohort, generated once per session) comes from conftest.py.


@pytest.mark.slow
def test_a_short_training_segments_hematomas_of_unseen_centres(tiny_cohort):
    from common.data.contract import read_cohort
    from common.data.dataset import SampleCache
    from common.training.evaluation import evaluate_segmentation

    cohort = read_cohort(tiny_cohort)
    cache = SampleCache((2.0, 2.0, 5.0))
    train = cache.load(c for k in ("center1", "center2", "center3") for c in cohort[k])
    test = cache.load(c for k in ("center4", "center5") for c in cohort[k][:5])
    torch.manual_seed(0)
    cpu_umamba = SegmentationSettings.from_profile(load_profile("cpu"), model="umamba-bot").model_overrides
    model = create_model("umamba-bot", 3, 2, **cpu_umamba)
    # A short budget: a high learning rate, half the patches on hematomas, no augmentation.
    train_segmentation(model, train, epochs=1, steps_per_epoch=120, patch_size=(16, 64, 64), lr=1e-2, seed=0,
                       foreground_fraction=0.5, augment=False)
    result = evaluate_segmentation(model, test, (16, 64, 64), overlap=0.1, satellite_mm=20.0)
    assert set(result["per_center"]) == {"center4", "center5"}
    threshold = np.mean([segmentation_metrics(keep_main_lesion(((s.hu >= 50) & (s.hu <= 100)).astype(np.uint8),
                                                               s.spacing, 20.0), s.mask, s.spacing)["dice"]
                         for s in test])
    dice = result["overall"]["dice"]["mean"]
    assert dice >= MIN_EXTERNAL_DICE and dice >= threshold + MIN_LEAD_OVER_THRESHOLD, (dice, threshold)


@pytest.mark.slow
def test_train_seg_end_to_end(tiny_cohort, tmp_path, capsys):
    out = tmp_path / "run"
    code = hemex(["train-seg", "--data", str(tiny_cohort), "--train-centers", "center1,center2",
                  "--test-centers", "center5", "--out", str(out), "--model", "unet", "--epochs", "1",
                  "--steps-per-epoch", "2", "--seed", "1"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert set(metrics["test"]["per_center"]) == {"center5"}
    assert len(metrics["test"]["per_case"]) == 10
    assert {"dice", "iou", "hd95_mm", "volume_abs_err_ml", "volume_abs_err_original_ml"} <= set(
        metrics["test"]["per_center"]["center5"])
    assert config["seed"] == 1 and config["profile"] == "cpu" and config["train_centers"] == ["center1", "center2"]
    assert config["versions"]["torch"] and config["architecture"]["model"] == "unet"
    model, record = load_checkpoint(out, expected=config["architecture"])
    assert record["train_centers"] == ["center1", "center2"]
    assert not list(out.glob(".*tmp"))
