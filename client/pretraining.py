"""Self-supervised pretraining of the classifier's encoder at the site: a round of masked image
modelling on its ROI slices (labelled or not), and the reconstruction loss on its validation cases."""

from __future__ import annotations

import time

from flwr.app import Context, Message, MetricRecord, RecordDict

from client.classifier import cls_model
from client.messages import global_round, receive_global, reply, small_group
from client.site import Site, site_from_context
from common.errors import DataError
from common.federation.records import WITHHELD, to_record
from common.training.classification.pretraining import MaskedImageModel, pretrain, reconstruction_loss
from common.training.classification.training import augment_batch


def ssl_model(site: Site) -> MaskedImageModel:
    windows = site.profile["preprocess"]["windows"]
    return MaskedImageModel(cls_model(site), len(windows) + site.cls.mask_channel)


def train_ssl(message: Message, context: Context) -> Message:
    """One round of masked-image pretraining of the classifier's encoder on the site's slices."""
    started = time.perf_counter()
    site = site_from_context(context.node_config, context.run_config)
    config = message.content["config"]
    server_round = global_round(config)
    model = ssl_model(site)
    receive_global(model, message.content["arrays"], context, "ssl", site.settings.fedbn)
    slices, n_cases = site.pretraining_slices("fit")
    if n_cases == 0:
        raise DataError(site.center, "no case with a hematoma mask to pretrain the classifier's encoder on")
    steps = site.pretraining.steps_per_round
    widths = [float(w) for _, w in site.profile["preprocess"]["windows"]]
    result = pretrain(model, slices, site.pretraining, seed=site.round_seed("ssl", server_round),
                      schedule_offset=(server_round - 1) * steps, schedule_total=site.settings.ssl_rounds * steps,
                      augment=(lambda x, g: augment_batch(x, site.cls, g, widths)) if site.cls.augment else None)
    metrics = {"num-examples": n_cases, "num-slices": len(slices), "train-loss": result["loss"],
               "first-loss": result["first-loss"], "seconds": result["seconds"],
               "handler-seconds": time.perf_counter() - started}
    return reply(message, RecordDict({"arrays": to_record(model.state_dict()), "metrics": MetricRecord(metrics)}),
                 model=message.content["arrays"])


def evaluate_ssl(message: Message, context: Context) -> Message:
    """The reconstruction loss of given pretraining weights on the site's validation cases."""
    site = site_from_context(context.node_config, context.run_config)
    model = ssl_model(site)
    receive_global(model, message.content["arrays"], context, "ssl", site.settings.fedbn)
    slices, n_cases = site.pretraining_slices("validation")
    metrics = {"num-examples": n_cases, "ssl-loss": float("nan")}
    if small_group(context, site, n_cases):
        metrics[WITHHELD] = 1
    elif n_cases:
        metrics["ssl-loss"] = reconstruction_loss(model, slices, site.pretraining)
    return reply(message, RecordDict({"metrics": MetricRecord(metrics)}))
