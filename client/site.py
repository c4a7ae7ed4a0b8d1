"""A hospital site as its ClientApp sees it: centre id, local data, preprocessed samples.

In deployment the SuperNode's node-config names the site (`center`, `data-path`); in simulation
each virtual node only knows its `partition-id`, mapped to a centre through the run config; the
centralized arm's extra virtual node ("pooled") holds every training centre's cases.
Samples are cached per process, so later rounds do not re-read scans.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.config import load_profile
from common.data.contract import Case, read_center
from common.data.dataset import SampleCache, split_by_center, with_masks
from common.data.io import slice_spacing_mm
from common.data.preprocess import DEFAULT_WINDOWS
from common.errors import ConfigError, HemexError
from common.federation.settings import POOLED, FederationSettings
from common.inference.mask_cache import DeliveredMasks
from common.training.classification.roi_cache import cached_reference_rois
from common.training.classification.pretraining import PretrainingSettings
from common.training.classification.rois import build_roi_dataset, roi_array, stratified_split
from common.training.classification.settings import ClassifierSettings
from common.training.settings import SegmentationSettings


class Site:
    def __init__(self, center: str, data_path: Path, settings: FederationSettings, work_dir: Path | None = None,
                 pooled_paths: tuple[Path, ...] = (), cache_dir: Path | None = None):
        self.center = center
        self.data_path = Path(data_path)
        self.settings = settings
        # Site-private outputs (synthetic ROIs): never sent anywhere.
        self.work_dir = Path(work_dir) if work_dir else Path(settings.out_dir) / "sites" / center
        # Site-private reusable work (trained generators, keyed by their inputs), kept across runs.
        self.cache_dir = Path(cache_dir) if cache_dir else (
            Path(settings.cache_dir or Path(settings.out_dir) / "site-cache") / center)
        self.profile = load_profile(settings.profile)
        self.cls = ClassifierSettings.from_profile(self.profile)
        self.pretraining = PretrainingSettings.from_profile(self.profile)
        self._rois = {}  # mask source -> (dataset, fit, val)
        self._pretraining_slices = {}  # split -> (slices, cases)
        overrides = {"model": settings.seg_model} if settings.seg_model else {}
        self.seg = SegmentationSettings.from_profile(self.profile, **overrides)
        preprocess = self.profile["preprocess"]
        # Preprocessed scans on the site's own disk too: a deployed SuperNode starts a fresh process
        # per message, and a simulated site's messages move between processes.
        self.cache = SampleCache(preprocess["spacing"], preprocess["windows"], disk=self.cache_dir / "samples")
        self.cases: list[Case] = ([case for path in pooled_paths for case in read_center(Path(path))] if pooled_paths
                                  else read_center(self.data_path))
        labelled, self.skipped = with_masks(self.cases, "segmentation")
        # A fixed split per site: the validation cases pick nothing globally, they only report.
        self.fit_cases, self.val_cases = split_by_center(labelled, self.seg.val_fraction, settings.seed)
        if self.seg.max_val_cases:
            self.fit_cases += self.val_cases[self.seg.max_val_cases:]
            self.val_cases = self.val_cases[: self.seg.max_val_cases]

    def round_seed(self, stage: str, server_round: int) -> int:
        """Distinct, reproducible seed per (run seed, stage, round, centre): a resumed run replays
        exactly the rounds an uninterrupted one would have run."""
        return (self.settings.seed * 1_000_003 + zlib.crc32(f"{stage}/{server_round}/{self.center}".encode())) % 2**31

    def roi_dataset(self, mask_provider=None):
        """ROIs of the labelled cases, split into a fit part and a validation part for the
        federated operating point; built once per process and mask source.

        Without `mask_provider` the ROIs are cut on the reference masks. With one (the federated
        segmentation model), they are cut on its masks, as they will be at inference, and the
        reference masks' markers become `aux_targets` (what the auxiliary regression should
        recover from the ROIs). A training case the model misses entirely is cut on its reference
        mask (at inference such a case gets no HE prediction at all, so nothing is learned that
        inference would contradict; without the fallback an untrained model would leave nothing
        to train on)."""
        source = "reference" if mask_provider is None else "segmentation"
        if source not in self._rois:
            # Marker features (volume, density, shape) are the auxiliary regression targets of
            # the classifier and the baseline arms' inputs; they are computed and used here, on site.
            with_markers = self.cls.aux_weight > 0 or "baselines" in self.settings.arms

            def build():
                return build_roi_dataset(self.cases, self.cls, mask_provider=_or_reference(mask_provider),
                                         with_markers=with_markers, reference_markers=mask_provider is not None)

            dataset = (cached_reference_rois(self.cache_dir / "rois", self.cases, self.cls, DEFAULT_WINDOWS,
                                             with_markers, build) if mask_provider is None else build())
            # Split each source centre on its own, so that the pooled node holds out exactly the
            # cases the training centres hold out.
            fit, val = [], []
            for center in sorted({r.center for r in dataset.cases}):
                index = [i for i, r in enumerate(dataset.cases) if r.center == center]
                f, v = stratified_split([dataset.cases[i].he for i in index], [center] * len(index),
                                        self.cls.val_fraction, self.settings.seed)
                fit += [dataset.cases[index[i]] for i in f]
                val += [dataset.cases[index[i]] for i in v]
            self._rois[source] = (dataset, fit, val)
        return self._rois[source]

    def delivered_masks(self, seg_state) -> DeliveredMasks:
        """The site's on-disk store of the masks this segmentation model delivers (held-out
        centres fill it while scoring the segmentation; their classifier ROIs read it back)."""
        seg = self.seg
        return DeliveredMasks(self.cache_dir / "delivered-masks", seg_state, {
            "model": seg.model, "overrides": seg.model_overrides, "roi": list(seg.inference_roi),
            "overlap": seg.sw_overlap, "sw_batch_size": seg.sw_batch_size, "satellite_mm": seg.satellite_mm,
            "spacing": list(self.cache.spacing), "windows": [list(w) for w in self.cache.windows]})

    def pretraining_slices(self, split: str = "fit") -> tuple[np.ndarray, int]:
        """ROI slices (N, C, P, P) for self-supervised pretraining and the number of cases they
        come from: every case of the segmentation's fit (or validation) split with a hematoma
        mask, labelled or not, `slices_per_case` slices each; cached like the classifier's ROIs."""
        if split not in self._pretraining_slices:
            cases = self.fit_cases if split == "fit" else self.val_cases
            settings = replace(self.cls, k_slices=self.pretraining.slices_per_case)
            dataset = cached_reference_rois(
                self.cache_dir / "rois", cases, settings, DEFAULT_WINDOWS, False,
                lambda: build_roi_dataset(cases, settings, require_label=False, with_markers=False), require_label=False)
            arrays = [roi_array(r, self.cls.mask_channel) for r in dataset.cases]
            slices = np.concatenate(arrays) if arrays else np.zeros((0,), np.float32)
            self._pretraining_slices[split] = (slices, len(arrays))
        return self._pretraining_slices[split]

    @staticmethod
    def aux_targets(dataset) -> dict | None:
        """Auxiliary marker targets: the reference masks' markers where ROIs come from a model."""
        return (dataset.reference_markers or dataset.markers) or None

    def info(self) -> dict:
        """Counts and the range of slice spacings: acquisition metadata, no patient data. The
        training sites' range goes into the model bundle, so `hemex predict` can warn about
        scans unlike any it was trained on."""
        he = [c.he for c in self.cases]
        spacings = []
        for case in self.cases:
            try:
                spacings.append(slice_spacing_mm(case.image_path))
            except HemexError:  # unreadable here: training reports it with the reason
                continue
        return {"num-cases": len(self.cases), "num-he": sum(1 for h in he if h == 1),
                "num-nhe": sum(1 for h in he if h == 0), "num-masks": sum(1 for c in self.cases if c.mask_path),
                "slice-mm-min": min(spacings, default=float("nan")), "slice-mm-max": max(spacings, default=float("nan"))}


def _or_reference(mask_provider):
    """The provider's mask, or the sample's reference mask where the provider finds nothing."""
    if mask_provider is None:
        return None

    def provide(sample):
        mask = mask_provider(sample)
        if (mask is None or not np.asarray(mask).any()) and sample.mask is not None:
            return sample.mask
        return mask

    return provide


def privacy_limits(node_config: dict, settings: FederationSettings) -> tuple[int, int]:
    """(min-aggregate-cases, max-cls-scorings): the run's values, tightened where the site's own
    node-config sets them (a coordinator cannot loosen a site's limits)."""
    limits = []
    for key, run_value, tighter in (("min-aggregate-cases", settings.min_aggregate_cases, max),
                                    ("max-cls-scorings", settings.max_cls_scorings, min)):
        value = node_config.get(key)
        if value is None:
            limits.append(run_value)
            continue
        try:
            site_value = int(value)
        except (TypeError, ValueError):
            site_value = 0
        if site_value < 1 or str(value).strip() != str(site_value):
            raise ConfigError(f"node-config {key} = {value!r}: expected an integer >= 1")
        limits.append(tighter(run_value, site_value))
    return limits[0], limits[1]


def site_from_context(node_config: dict, run_config: dict) -> Site:
    settings = FederationSettings.from_run_config(run_config)
    work_dir = cache_dir = ""
    if "center" in node_config:  # deployment: the site names itself
        center = str(node_config["center"])
        data_path = Path(str(node_config.get("data-path", "")))
        work_dir = str(node_config.get("work-dir", data_path.parent / f".hemex-{center}"))
        cache_dir = str(node_config.get("cache-dir", Path(work_dir) / "cache"))
        if not data_path.is_dir():
            raise ConfigError(f"node-config data-path {str(data_path)!r} of centre {center} is not a folder")
    else:  # simulation: partition-id indexes the run config's centre list
        partition = int(node_config["partition-id"])
        if not settings.centers or partition >= len(settings.node_centers):
            raise ConfigError(f"partition-id {partition} has no centre: run-config centers = {settings.centers}")
        center = settings.node_centers[partition]
        data_path = Path(settings.data_root) / center
    pooled = tuple(str(Path(settings.data_root) / c) for c in settings.train_centers) if center == POOLED else ()
    return cached_site(center, str(data_path), work_dir, tuple(sorted(settings.to_run_config().items())), pooled,
                       cache_dir)


@lru_cache(maxsize=8)
def cached_site(center: str, data_path: str, work_dir: str, run_config_items: tuple, pooled: tuple = (),
                cache_dir: str = "") -> Site:
    return Site(center, Path(data_path), FederationSettings.from_run_config(dict(run_config_items)), work_dir or None,
                pooled_paths=tuple(Path(p) for p in pooled), cache_dir=cache_dir or None)
