"""The HE-classifier handlers: a round of local training (or a whole local-only run) on the site's
ROIs and its own synthetic HE ROIs, and the scoring of one or several models on its cases."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.messages import global_round, proximal_mu, receive_global, reply, small_group, spend_scorings
from client.site import Site, site_from_context
from common.baselines import BASELINE_ARMS, baseline_logits, feature_matrix
from common.data.preprocess import resample_sample
from common.federation import binned
from common.federation.records import WITHHELD, from_record, load_global, to_record
from common.metrics.classification import Z95, delong_ci, delong_test
from common.synthesis.run import load_synthetic, resize_rois
from common.training.classification.prediction import case_logits
from common.training.classification.rois import build_roi_dataset
from common.training.classification.rois import key as case_key
from common.training.classification.settings import create_model as create_classifier_model
from common.training.classification.site_training import Schedule, round_schedule, train_at_site
from common.training.privacy import DPSettings


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


def train_cls(message: Message, context: Context) -> Message:
    """One federated round of the classifier (the strategy's messages)."""
    return train_classifier_message(message, context, alone=False)


def train_cls_alone(message: Message, context: Context) -> Message:
    """A whole local training run from the given weights, config `epochs` long (the local-only and
    centralized arms: a site, or the pooled node, training by itself)."""
    return train_classifier_message(message, context, alone=True)


def train_classifier_message(message: Message, context: Context, alone: bool) -> Message:
    started = time.perf_counter()
    site = site_from_context(context.node_config, context.run_config)
    config = message.content["config"]
    # A local run draws the seeds of a federated first round: the arms differ in their data, not their luck.
    server_round = 1 if alone else global_round(config)
    seed = site.round_seed("cls", server_round)
    arm = str(config.get("arm", "federated"))
    model = cls_model(site)
    # FedBN keeps norm layers per arm; a whole local run has no global model to mix with.
    fedbn = site.settings.fedbn and not alone
    local_keys = receive_global(model, message.content["arrays"], context, state_stage(arm), fedbn)
    dataset, fit, _ = site.roi_dataset(training_mask_provider(site, message))
    use_synthetic = (bool(config.get("use-synthetic", site.settings.synthesis != "none"))
                     and site.settings.dp_sgd_noise_multiplier == 0)
    extra, extra_masks = synthetic_rois(site) if use_synthetic else (None, None)
    settings = site.settings
    n_extra = 0 if extra is None else len(extra)  # synthetic ROIs are all HE
    if not alone and not 0 < sum(r.he == 1 for r in fit) + n_extra < len(fit) + n_extra:
        # A federated round at a site whose training cases hold one class (a small hospital with
        # no HE case): nothing to learn about HE vs not, so it returns the global weights with
        # weight 0. A local-only arm there fails instead: it would have no model to report.
        return skip_round(message, model, settings, len(dataset.excluded), started)
    dp = (DPSettings(settings.dp_sgd_noise_multiplier, settings.dp_sgd_max_grad_norm, settings.dp_sgd_delta)
          if settings.dp_sgd_noise_multiplier > 0 else None)
    schedule = (Schedule(int(config["epochs"])) if alone else
                round_schedule(fit, site.cls, dp is not None, settings.cls_epochs, server_round, settings.cls_rounds))
    dp_key = f"{state_stage(arm)}-dp-steps"  # the site's DP-SGD steps so far: its epsilon covers every round
    metrics = train_at_site(model, fit, schedule, settings=site.cls, windows=site.profile["preprocess"]["windows"],
                            seed=seed, dp=dp, dp_prior_steps=int(context.state[dp_key]["steps"])
                            if dp_key in context.state else 0, extra_he_rois=extra, extra_he_masks=extra_masks,
                            proximal_mu=proximal_mu(config), aux_targets=site.aux_targets(dataset))
    if dp is not None:
        context.state[dp_key] = MetricRecord({"steps": metrics["dp-steps"]})
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
    """Masks from the federated segmentation model, on each sample's own grid: read from the
    site's store when this centre's segmentation scoring already delivered them, else predicted
    (and stored). The model is built on the first mask predicted: a site whose ROIs or masks are
    already cached never builds it."""
    state = from_record(seg_weights)
    delivered = site.delivered_masks(state)
    cases = {(c.center, c.case_id): c for c in site.cases}
    built = []

    def provide(sample):
        case = cases.get((sample.center, sample.case_id))
        stored = delivered.get(case) if case is not None else None
        if stored is not None and stored.shape == sample.hu.shape:
            return stored
        # Imported here: a classifier message on reference masks (the default) never segments,
        # and the segmentation stack (MONAI, the networks) costs seconds in every fresh process.
        from client.segmentation import seg_model
        from common.inference.segmentation import segment
        from common.training.evaluation import delivered_mask

        if not built:
            built.append(seg_model(site))
            load_global(built[0], state)
            built[0].eval()
        working = resample_sample(sample, site.cache.spacing, site.cache.windows)
        pred, probabilities = segment(built[0], working.image, site.seg.inference_roi, spacing=working.spacing,
                                      satellite_mm=site.seg.satellite_mm, hu=working.hu, overlap=site.seg.sw_overlap,
                                      sw_batch_size=site.seg.sw_batch_size)
        mask = delivered_mask(pred, probabilities, working, sample)
        if case is not None:
            delivered.put(case, mask)
        return mask

    return provide


def training_mask_provider(site: Site, message: Message):
    """The federated segmentation model's masks when the message carries its weights (the server
    sends them with cls-masks = segmentation), else None (reference masks)."""
    records = message.content.array_records
    return segmentation_mask_provider(site, records["seg-arrays"]) if "seg-arrays" in records else None


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
