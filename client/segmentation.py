"""The segmentation handlers: a round of local U-Mamba training, and the metrics of given weights
on the site's cases (aggregates only; a held-out centre also scores the delivered masks)."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from client.messages import global_round, proximal_mu, receive_global, reply, small_group
from client.site import Site, privacy_limits, site_from_context
from common.data.preprocess import load_case
from common.federation.records import WITHHELD, to_record
from common.files import seed_everything
from common.training.central import IN_CHANNELS_PER_WINDOW, OUT_CHANNELS
from common.training.checkpoint import architecture, build_model
from common.training.evaluation import evaluate_segmentation
from common.training.segmentation import train_segmentation


def seg_model(site: Site):
    arch = architecture(site.seg.model, len(site.cache.windows) * IN_CHANNELS_PER_WINDOW, OUT_CHANNELS,
                        site.seg.model_overrides)
    return build_model(arch)


def train_seg(message: Message, context: Context) -> Message:
    started = time.perf_counter()
    site = site_from_context(context.node_config, context.run_config)
    config = message.content["config"]
    server_round = global_round(config)
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
        native = keep = None
        if split == "all":
            native = lambda s: load_case(by_key[(s.center, s.case_id)], spacing=None)  # noqa: E731
            # Kept on the site's disk: the classifier's ROIs at this centre are cut on these masks.
            delivered = site.delivered_masks(model.state_dict())
            keep = lambda s, mask: delivered.put(by_key[(s.center, s.case_id)], mask)  # noqa: E731
        evaluation = evaluate_segmentation(model, site.cache.load(cases), site.seg.inference_roi,
                                           overlap=site.seg.sw_overlap, sw_batch_size=site.seg.sw_batch_size,
                                           satellite_mm=site.seg.satellite_mm, native=native, keep_delivered=keep)
        overall = evaluation["overall"]
        dice, volume = overall["dice"], overall["volume_abs_err_ml"]
        # The Dice distribution travels as its five-number summary, never as per-case values.
        metrics.update({"dice": dice["mean"], "iou": overall["iou"]["mean"],
                        "hd95-mm": _finite(overall["hd95_mm"]["median"]),
                        "volume-median-abs-err-ml": volume["median"], "volume-mae-ml": volume["mean"],
                        **{f"dice-{q}": dice[q] for q in ("min", "q25", "median", "q75", "max")}})
        if "dice_native" in overall:
            metrics.update({"dice-native": overall["dice_native"]["mean"],
                            "volume-mae-native-ml": overall["volume_abs_err_native_ml"]["mean"],
                            "volume-median-abs-err-native-ml": overall["volume_abs_err_native_ml"]["median"],
                            **small_lesion_dice(evaluation["per_case"], context, site)})
    return reply(message, RecordDict({"metrics": MetricRecord(metrics)}))


SMALL_LESION_ML = 5.0  # lesions this small are scored apart: the working grid misses them first


def small_lesion_dice(per_case: list[dict], context: Context, site: Site) -> dict:
    """Mean delivered-mask Dice over lesions under SMALL_LESION_ML and their count; the mean is -1
    when there are none or fewer than the site's small-group limit (one case's own Dice)."""
    small = [r["dice_native"] for r in per_case if r["vol_ref_native_ml"] < SMALL_LESION_ML]
    withheld = not small or len(small) < privacy_limits(context.node_config, site.settings)[0]
    return {"dice-native-small": -1.0 if withheld else float(np.mean(small)), "n-small": len(small)}


def _finite(value) -> float:
    return float(value) if value is not None and np.isfinite(value) else -1.0
