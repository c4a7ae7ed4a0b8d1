"""hemex ClientApp: a hospital site's side of the federation.

Handlers (message type -> what the site does on its own data):
  query.info     centre id and case counts
  train.seg      local segmentation training from the global weights
  evaluate.seg   segmentation metrics of given weights on local cases (aggregates only)
  query.synth    on-site generator training, generation and memorization audit; the synthetic
                 HE ROIs stay in the site's work folder
  train.cls      local HE-classifier training on ROIs (+ the site's own synthetic HE ROIs)
  evaluate.cls   classifier metrics on local cases; ROIs from reference masks or from the
                 federated segmentation model; validation logits only as class histograms
                 (the baseline arms, logistic regressions on the NCCT markers, are scored here too)
  train.baseline the baseline arms' fitting: per-feature moments of the fit cases' markers, then
                 the summed log-loss, gradient and Hessian at the coordinator's coefficients

Every reply passes `check_reply`: model weights and aggregate scalars, nothing per patient.
Aggregates of fewer than min-aggregate-cases cases are withheld (counts and `withheld` = 1 only),
and a site scores at most max-cls-scorings classifier models per run.
A handler's exception leaves the site only as its class, a short code and a digest (`client/errors.py`).
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.errors import site_errors
from client.site import Site, privacy_limits, site_from_context
from common.data.preprocess import load_case, resample_sample
from common.federation import binned
from common.federation.records import (WITHHELD, PrivacyViolation, check_reply, from_record, load_global, norm_keys,
                                       to_record)
from common.files import seed_everything
from common.training.central import IN_CHANNELS_PER_WINDOW, OUT_CHANNELS
from common.training.checkpoint import architecture, build_model
from common.training.evaluation import evaluate_segmentation
from common.synthesis.run import MIN_HE_CASES, load_synthetic, resize_rois, run_synth, usable_he_cases
from common.baselines import (BASELINE_ARMS, MARKER_MODEL_FEATURES, baseline_logits, feature_matrix, site_moments,
                              site_newton_terms)
from common.training.classification.prediction import case_logits
from common.training.classification.rois import build_roi_dataset
from common.training.classification.rois import key as case_key
from common.training.classification.settings import create_model as create_classifier_model
from common.training.classification.training import Budget, train_classifier
from common.metrics.classification import Z95, delong_ci, delong_test
from common.inference.segmentation import mask_on_grid, segment
from common.inference.postprocess import refine_boundary
from common.training.privacy import DPSettings, train_classifier_dp
from common.training.segmentation import train_segmentation

app = ClientApp(mods=[site_errors])


def reply(message: Message, content: RecordDict, model=None) -> Message:
    """The whitelisted reply; weights must match `model` (the received global weights)."""
    return Message(check_reply(content, model), reply_to=message)


def proximal_mu(config: ConfigRecord) -> float:
    """FedProx's proximal weight, as the strategy sends it with each training round (0 otherwise)."""
    return float(config.get("proximal-mu", 0.0))


def seg_model(site: Site):
    arch = architecture(site.seg.model, len(site.cache.windows) * IN_CHANNELS_PER_WINDOW, OUT_CHANNELS,
                        site.seg.model_overrides)
    return build_model(arch)


def receive_global(model, record: ArrayRecord, context: Context, stage: str, fedbn: bool) -> set[str]:
    """Load the global weights; under FedBN keep this site's own normalisation layers, which
    persist across rounds in the node's context state (one entry per stage / arm)."""
    local_keys = norm_keys(model) if fedbn else set()
    key = f"{stage}-local-norm"
    if fedbn and key in context.state:
        model.load_state_dict(from_record(context.state[key]), strict=False)
    load_global(model, from_record(record), keep_local=local_keys if key in context.state else set())
    return local_keys


@app.query("info")
def info(message: Message, context: Context) -> Message:
    site = site_from_context(context.node_config, context.run_config)
    return reply(message, RecordDict({"info": ConfigRecord({"center": site.center}),
                                      "metrics": MetricRecord(site.info())}))


@app.train("seg")
def train_seg(message: Message, context: Context) -> Message:
    started = time.perf_counter()
    site = site_from_context(context.node_config, context.run_config)
    config = message.content["config"]
    server_round = int(config["server-round"]) + int(config.get("round-offset", 0))  # global round after a resume
    seed = site.round_seed("seg", server_round)
    seed_everything(seed)
    model = seg_model(site)
    local_keys = receive_global(model, message.content["arrays"], context, "seg", site.settings.fedbn)
    settings, seg = site.settings, site.seg
    epochs = settings.seg_epochs
    result = train_segmentation(
        model, site.cache.load(site.fit_cases), epochs=epochs, steps_per_epoch=seg.steps_per_epoch,
        patch_size=seg.patch_size, batch_size=seg.batch_size, lr=seg.lr, seed=seed,
        proximal_mu=proximal_mu(config), optimizer=seg.optimizer, weight_decay=seg.weight_decay,
        momentum=seg.momentum, schedule=seg.schedule,
        # Continue one learning-rate schedule across rounds rather than restarting it each round.
        schedule_offset=(server_round - 1) * epochs * seg.steps_per_epoch,
        schedule_total=settings.seg_rounds * epochs * seg.steps_per_epoch,
        grad_clip=seg.grad_clip, foreground_fraction=seg.foreground_fraction,
        hard_negative_fraction=seg.hard_negative_fraction, precision=seg.precision, augment=seg.augment,
        restore_best=False,
    )
    state = model.state_dict()
    if local_keys:
        context.state["seg-local-norm"] = to_record({k: state[k] for k in local_keys})
    metrics = {"num-examples": len(site.fit_cases), "train-loss": result.metrics["train_loss"],
               "seconds": result.metrics.get("seconds", 0.0), "handler-seconds": time.perf_counter() - started}
    return reply(message, RecordDict({"arrays": to_record(state), "metrics": MetricRecord(metrics)}),
                 model=message.content["arrays"])


@app.evaluate("seg")
def evaluate_seg(message: Message, context: Context) -> Message:
    site = site_from_context(context.node_config, context.run_config)
    split = str(message.content["config"].get("split", "validation"))
    cases = site.val_cases if split == "validation" else site.fit_cases + site.val_cases
    model = seg_model(site)
    receive_global(model, message.content["arrays"], context, "seg", site.settings.fedbn)
    metrics = {"num-examples": len(cases)}
    if small_group(context, site, len(cases)):
        metrics[WITHHELD] = 1
    elif cases:
        # A held-out centre (every case) also scores the mask hemex delivers, on each scan's own grid.
        by_key = {(c.center, c.case_id): c for c in cases}
        native = (lambda s: load_case(by_key[(s.center, s.case_id)], spacing=None)) if split == "all" else None
        evaluation = evaluate_segmentation(model, site.cache.load(cases), site.seg.inference_roi,
                                           overlap=site.seg.sw_overlap, sw_batch_size=site.seg.sw_batch_size,
                                           satellite_mm=site.seg.satellite_mm, native=native)
        overall = evaluation["overall"]
        dice, volume = overall["dice"], overall["abs_vol_err_ml"]
        # The Dice distribution travels as its five-number summary, never as per-case values.
        metrics.update({"dice": dice["mean"], "iou": overall["iou"]["mean"],
                        "hd95-mm": _finite(overall["hd95_mm"]["median"]),
                        "abs-vol-err-ml": volume["median"], "vol-mae-ml": volume["mean"],
                        **{f"dice-{q}": dice[q] for q in ("min", "q25", "median", "q75", "max")}})
        if "dice_native" in overall:
            metrics.update({"dice-native": overall["dice_native"]["mean"],
                            "vol-mae-native-ml": overall["abs_vol_err_native_ml"]["mean"],
                            "vol-median-native-ml": overall["abs_vol_err_native_ml"]["median"],
                            **small_lesion_dice(evaluation["per_case"], context, site)})
    return reply(message, RecordDict({"metrics": MetricRecord(metrics)}))


SMALL_LESION_ML = 5.0  # lesions this small are scored apart: the working grid misses them first
SCORINGS_KEY = "cls-scorings"  # classifier models scored so far in this run (node context state)


def small_group(context: Context, site: Site, n: int) -> bool:
    """True when n cases are too few to report aggregates of (a Dice summary or a histogram of
    a handful of cases is each case's own value)."""
    return 0 < n < privacy_limits(context.node_config, site.settings)[0]


def spend_scorings(context: Context, site: Site, n: int) -> None:
    """Count n classifier scorings against the run's bound: many thresholds or slightly different
    models scored on the same cases would reveal each case's score."""
    cap = privacy_limits(context.node_config, site.settings)[1]
    used = int(context.state[SCORINGS_KEY]["used"]) if SCORINGS_KEY in context.state else 0
    if used + n > cap:
        raise PrivacyViolation(f"scoring {n} more classifier model(s) after {used} would exceed max-cls-scorings {cap}")
    context.state[SCORINGS_KEY] = MetricRecord({"used": used + n})


def small_lesion_dice(per_case: list[dict], context: Context, site: Site) -> dict:
    """Mean delivered-mask Dice over lesions under SMALL_LESION_ML and their count; the mean is -1
    when there are none or fewer than the site's small-group limit (one case's own Dice)."""
    small = [r["dice_native"] for r in per_case if r["vol_ref_native_ml"] < SMALL_LESION_ML]
    withheld = not small or len(small) < privacy_limits(context.node_config, site.settings)[0]
    return {"dice-native-small": -1.0 if withheld else float(np.mean(small)), "n-small": len(small)}


def _finite(value) -> float:
    return float(value) if value is not None and np.isfinite(value) else -1.0



# ------------------------------------------------------------------------------------------
# HE classifier


def cls_model(site: Site):
    return create_classifier_model(site.cls, site.profile["preprocess"]["windows"])


def synthetic_rois(site: Site):
    """The site's accepted synthetic HE ROIs at the classifier's ROI size, if its synthesis stage
    produced any. They are read from the site's own work folder and never sent anywhere."""
    path = site.work_dir / "synthetic_he.npz"
    if not path.is_file():
        return None, None
    images, masks, _ = load_synthetic(path)
    if len(images) == 0:
        return None, None
    return resize_rois(images, site.cls.pixels, masks)


@app.query("synth")
def synthesize(message: Message, context: Context) -> Message:
    """Train the site's generator on its HE ROIs, generate toward the HE:NHE ratio, audit for
    memorization and realism; keep the accepted samples on site, report only counts and audit numbers."""
    site = site_from_context(context.node_config, context.run_config)
    n_he = usable_he_cases(site.data_path.parent, site.data_path.name)
    if n_he < MIN_HE_CASES:  # a small site: nothing to learn from, so it trains on its real ROIs only
        return reply(message, RecordDict({"metrics": MetricRecord({"num-kept": 0, "num-needed": 0,
                                                                   "skipped-he-cases": n_he})}))
    audit = run_synth(site.data_path.parent, site.data_path.name, site.work_dir, profile=site.settings.profile,
                      seed=site.round_seed("synth", 0), ratio=site.settings.synthesis, log=lambda _text: None,
                      cache_dir=site.cache_dir)
    memo = audit["memorization"]
    metrics = {"num-kept": int(memo["kept"]), "num-needed": int(memo["needed"]), "num-candidates": int(memo["synthetic"]),
               "num-accepted": int(memo["accepted"]), "audit-threshold": float(memo["threshold"]),
               "generator-cached": int(bool((audit.get("training") or {}).get("cached")))}
    realism = audit.get("realism")
    if realism is not None:  # set-level numbers only, never an image
        distance = audit["feature_distance"]
        metrics.update({"realism-mmd2": realism["mmd2_synthetic"], "realism-threshold": realism["mmd2_threshold"],
                        "realism-passed": -1 if realism["passed"] is None else int(realism["passed"]),
                        "realism-precision": distance["precision"], "realism-recall": distance["recall"]})
    if memo.get("nn_distance_ratio") is not None:
        metrics["nn-distance-ratio"] = float(memo["nn_distance_ratio"])
    return reply(message, RecordDict({"metrics": MetricRecord(metrics)}))


@app.train("cls")
def train_cls(message: Message, context: Context) -> Message:
    """One federated round (the strategy's messages), or, with config `epochs`, a whole local
    training run from the given weights (the local-only and centralized arms)."""
    started = time.perf_counter()
    site = site_from_context(context.node_config, context.run_config)
    config = message.content["config"]
    server_round = int(config["server-round"]) + int(config.get("round-offset", 0))
    seed = site.round_seed("cls", server_round)
    arm = str(config.get("arm", "federated"))
    model = cls_model(site)
    # FedBN keeps norm layers per arm; a whole local run has no global model to mix with.
    fedbn = site.settings.fedbn and "epochs" not in config
    local_keys = receive_global(model, message.content["arrays"], context, state_stage(arm), fedbn)
    dataset, fit, _ = site.roi_dataset(training_mask_provider(site, message))
    use_synthetic = (bool(config.get("use-synthetic", site.settings.synthesis != "none"))
                     and site.settings.dp_sgd_noise_multiplier == 0)
    extra, extra_masks = synthetic_rois(site) if use_synthetic else (None, None)
    settings = site.settings
    n_extra = 0 if extra is None else len(extra)  # synthetic ROIs are all HE
    if "epochs" not in config and not 0 < sum(r.he == 1 for r in fit) + n_extra < len(fit) + n_extra:
        # A federated round at a site whose training cases hold one class (a small hospital with
        # no HE case): nothing to learn about HE vs not, so it returns the global weights with
        # weight 0. A local-only arm there fails instead: it would have no model to report.
        return skip_round(message, model, settings, len(dataset.excluded), started)
    if settings.dp_sgd_noise_multiplier > 0:  # DP-SGD draws patients, not slices
        steps_per_epoch = max(1, len(fit) // max(1, min(site.cls.batch_size, len(fit))))
    else:
        steps_per_epoch = max(1, sum(len(r.images) for r in fit) // site.cls.batch_size)
    if "epochs" in config:
        epochs, offset, total = int(config["epochs"]), 0, None
    else:
        epochs = site.settings.cls_epochs
        offset = (server_round - 1) * epochs * steps_per_epoch
        total = site.settings.cls_rounds * epochs * steps_per_epoch
    if settings.dp_sgd_noise_multiplier > 0:
        # Patient-level DP-SGD; synthetic ROIs are left out (their generator is not private).
        dp = DPSettings(settings.dp_sgd_noise_multiplier, settings.dp_sgd_max_grad_norm, settings.dp_sgd_delta)
        key = f"{state_stage(arm)}-dp-steps"
        prior = int(context.state[key]["steps"]) if key in context.state else 0
        trained = train_classifier_dp(model, fit, epochs, dp, settings=site.cls, seed=seed,
                                      windows=site.profile["preprocess"]["windows"], prior_steps=prior,
                                      schedule_offset=offset, schedule_total=total)
        context.state[key] = MetricRecord({"steps": int(trained["total_steps"])})
        metrics = {"train-loss": trained["train_loss"], "num-synthetic": 0, "dp-epsilon": trained["epsilon"],
                   "dp-delta": dp.delta, "dp-steps": int(trained["total_steps"]), "seconds": trained["seconds"]}
    else:
        result = train_classifier(model, fit, Budget(epochs=epochs), seed=seed, extra_he_rois=extra,
                                  extra_he_masks=extra_masks, proximal_mu=proximal_mu(config), settings=site.cls,
                                  windows=site.profile["preprocess"]["windows"], aux_targets=site.aux_targets(dataset),
                                  schedule_offset=offset, schedule_total=total)
        metrics = {"train-loss": result.metrics["train_loss"], "num-synthetic": int(result.metrics.get("num_extra", 0)),
                   "seconds": float(result.metrics.get("seconds", 0.0))}
    state = model.state_dict()
    if local_keys:
        context.state[f"{state_stage(arm)}-local-norm"] = to_record({k: state[k] for k in local_keys})
    metrics.update({"num-examples": len(fit), "num-excluded": len(dataset.excluded),
                    "handler-seconds": time.perf_counter() - started})
    return reply(message, RecordDict({"arrays": to_record(state), "metrics": MetricRecord(metrics)}),
                 model=message.content["arrays"])


def skip_round(message: Message, model, settings, excluded: int, started: float) -> Message:
    """The round's reply of a site that does not train: the received weights, the same metric keys
    as a trained reply (Flower aggregates only uniform replies), no examples, no loss. Under DP-SGD
    such a site never trains, so it has spent no privacy budget."""
    state = model.state_dict()
    metrics = {"train-loss": float("nan"), "num-synthetic": 0, "seconds": 0.0}
    if settings.dp_sgd_noise_multiplier > 0:
        metrics.update({"dp-epsilon": 0.0, "dp-delta": settings.dp_sgd_delta, "dp-steps": 0})
    metrics.update({"num-examples": 0, "num-excluded": excluded, "handler-seconds": time.perf_counter() - started})
    return reply(message, RecordDict({"arrays": to_record(state), "metrics": MetricRecord(metrics)}),
                 model=message.content["arrays"])


def state_stage(arm: str) -> str:
    return "cls" if arm in ("federated", "") else f"cls-{arm}"


def segmentation_mask_provider(site: Site, seg_weights: ArrayRecord):
    """Masks from the federated segmentation model, on each sample's own grid. The model is built
    on the first mask asked for: a site whose ROIs are already cached never builds it."""
    built = []

    def provide(sample):
        if not built:
            built.append(seg_model(site))
            load_global(built[0], from_record(seg_weights))
            built[0].eval()
        model = built[0]
        working = resample_sample(sample, site.cache.spacing, site.cache.windows)
        pred, probabilities = segment(model, working.image, site.seg.inference_roi, spacing=working.spacing,
                                      satellite_mm=site.seg.satellite_mm, hu=working.hu, overlap=site.seg.sw_overlap,
                                      sw_batch_size=site.seg.sw_batch_size)
        native = sitk.GetArrayFromImage(mask_on_grid(pred, probabilities, working.working, sample.working))
        return refine_boundary(native, sample.hu, sample.spacing)

    return provide


def training_mask_provider(site: Site, message: Message):
    """The federated segmentation model's masks when the message carries its weights (the server
    sends them with cls-masks = segmentation), else None (reference masks)."""
    records = message.content.array_records
    return segmentation_mask_provider(site, records["seg-arrays"]) if "seg-arrays" in records else None


@app.evaluate("cls")
def evaluate_cls(message: Message, context: Context) -> Message:
    """Score given classifier weights on local cases. One model ("arrays", a strategy's round)
    or several ("arm.<name>", the final comparison): the ROIs are built once and every arm is
    scored on the same cases, so arms are compared paired (DeLong) here, on site. Per arm only
    aggregates come back: AUC with its DeLong CI, Brier, sensitivity and specificity at the
    given operating point, 16-bin logit histograms per class."""
    site = site_from_context(context.node_config, context.run_config)
    config = message.content["config"]
    split = str(config.get("split", "validation"))
    arms = {k[len("arm."):]: r for k, r in message.content.array_records.items() if k.startswith("arm.")}
    if str(config.get("mask-source", "reference")) == "segmentation" and split == "all":
        # A held-out centre: every case, on the federated segmentation's masks (the baseline arms
        # read their markers off the same masks).
        provider = segmentation_mask_provider(site, message.content["seg-arrays"])
        dataset = build_roi_dataset(site.cases, site.cls, mask_provider=provider,
                                    with_markers=any(a in BASELINE_ARMS for a in arms))
        rois = dataset.cases
    else:
        dataset, _, val = site.roi_dataset(training_mask_provider(site, message))
        rois = val if split == "validation" else dataset.cases
    labels = np.array([r.he for r in rois], dtype=int)
    counts = {"num-examples": len(rois), "num-he": int(labels.sum()), "num-excluded": len(dataset.excluded)}
    if small_group(context, site, len(rois)):
        return reply(message, RecordDict({"metrics": MetricRecord({**counts, WITHHELD: 1})}))
    spend_scorings(context, site, max(1, len(arms)))
    if not arms:
        model = cls_model(site)
        receive_global(model, message.content["arrays"], context, state_stage(str(config.get("arm", "federated"))),
                       site.settings.fedbn)
        z = case_logits(model, rois, site.cls) if rois else np.zeros(0)
        # Flower aggregates a round's replies only when every site sends the same keys; a site whose
        # validation cases hold one class (or none) has no AUC, and NaN says so.
        padded = {**{k: float("nan") for k in ROUND_METRICS}, **binned.to_metrics(z, labels),
                  **score_metrics(labels, z, config)}
        return reply(message, RecordDict({"metrics": MetricRecord({**counts, **padded})}))
    logits = {}
    for arm, record in arms.items():
        if arm in BASELINE_ARMS:  # a logistic regression on the same cases' markers
            logits[arm] = baseline_logits({k: v.numpy() for k, v in record.items()},
                                          feature_matrix(dataset.markers, [case_key(r) for r in rois],
                                                         BASELINE_ARMS[arm]))
            continue
        model = cls_model(site)
        receive_global(model, record, context, state_stage(arm), site.settings.fedbn)
        logits[arm] = case_logits(model, rois, site.cls) if rois else np.zeros(0)
    content = RecordDict({"metrics": MetricRecord(counts)})
    for arm, z in logits.items():
        metrics = score_metrics(labels, z, config, prefix=f"{arm}.")
        if arm != "federated" and "federated" in logits and 0 < labels.sum() < len(labels):
            test = delong_test(labels, z, logits["federated"])
            se = (test["diff_ci"][1] - test["diff_ci"][0]) / (2 * Z95)
            metrics.update({"vs-federated-diff": test["diff"], "vs-federated-se": se, "vs-federated-p": test["p"]})
        content[f"arm.{arm}"] = MetricRecord(metrics)
    return reply(message, content)


ROUND_METRICS = ("brier", "auc", "auc-lo", "auc-hi", "auc-se", "sensitivity", "specificity")


def score_metrics(labels: np.ndarray, z: np.ndarray, config: ConfigRecord, prefix: str = "") -> dict:
    """Aggregates of one model's patient logits; the operating point (`<prefix>calib-a`,
    `calib-b`, `threshold`) comes from the server, fixed on the training centres."""
    if not len(z):
        return {}
    metrics = dict(binned.to_metrics(z, labels))
    a, b = float(config.get(f"{prefix}calib-a", 1.0)), float(config.get(f"{prefix}calib-b", 0.0))
    prob = 1 / (1 + np.exp(-(a * z + b)))
    metrics["brier"] = float(np.mean((prob - labels) ** 2))
    if 0 < labels.sum() < len(labels):
        auc, low, high, se = delong_ci(labels, z)
        metrics.update({"auc": auc, "auc-lo": low, "auc-hi": high, "auc-se": se})
    if f"{prefix}threshold" in config:
        predicted = prob >= float(config[f"{prefix}threshold"])
        if labels.sum():
            metrics["sensitivity"] = float(predicted[labels == 1].mean())
        if (labels == 0).sum():
            metrics["specificity"] = float((~predicted[labels == 0]).mean())
    return metrics


# ------------------------------------------------------------------------------------------
# Baseline arms: logistic regressions on the NCCT markers, fitted on aggregates


@app.train("baseline")
def train_baseline(message: Message, context: Context) -> Message:
    """The site's part in fitting the baseline arms (server/baselines.py), on the markers of the
    fit cases the classifier arms train on (reference masks, or the federated segmentation's
    when its weights ride along). Step "moments": per-feature count, sum and sum of squares.
    Step "newton": for each model sent ("baseline.<arm>": coefficients, pooled mean and scale),
    the summed log-loss, gradient and Hessian at those coefficients. Sums only, never a case's
    values; fewer fit cases than min-aggregate-cases: counts and withheld = 1."""
    site = site_from_context(context.node_config, context.run_config)
    dataset, fit, _ = site.roi_dataset(training_mask_provider(site, message))
    labels = np.array([r.he for r in fit], dtype=int)
    keys = [case_key(r) for r in fit]
    if small_group(context, site, len(fit)) or not fit:
        return reply(message, RecordDict({"metrics": MetricRecord({"num-examples": len(fit), WITHHELD: 1})}))
    if str(message.content["config"].get("step", "newton")) == "moments":
        metrics = {"num-examples": len(fit), "num-he": int(labels.sum()),
                   **site_moments(feature_matrix(dataset.markers, keys, MARKER_MODEL_FEATURES), MARKER_MODEL_FEATURES)}
        return reply(message, RecordDict({"metrics": MetricRecord(metrics)}))
    content = RecordDict()
    for name, record in message.content.array_records.items():
        arm = name.removeprefix("baseline.")
        if name.startswith("baseline.") and arm in BASELINE_ARMS:
            model = {k: v.numpy() for k, v in record.items()}
            x = feature_matrix(dataset.markers, keys, BASELINE_ARMS[arm])
            content[name] = MetricRecord({"num-examples": len(fit), **site_newton_terms(x, labels, model)})
    return reply(message, content)
