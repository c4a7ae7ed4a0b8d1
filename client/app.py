"""hemex ClientApp: a hospital site's side of the federation.

Handlers (message type -> what the site does on its own data):
  query.info     centre id and case counts
  train.seg      local segmentation training from the global weights
  evaluate.seg   segmentation metrics of given weights on local cases (aggregates only)
  train.ssl      self-supervised pretraining of the classifier's encoder (masked image modelling)
                 on the site's ROI slices, labelled or not
  evaluate.ssl   its reconstruction loss on the site's validation cases (an aggregate)
  query.synth    on-site generator training, generation and memorization audit; the synthetic
                 HE ROIs stay in the site's work folder
  train.cls      a round of local HE-classifier training on ROIs (+ the site's own synthetic HE ROIs)
  train.cls_alone a whole local classifier run (the local-only and centralized arms)
  evaluate.cls   classifier metrics on local cases; ROIs from reference masks or from the
                 federated segmentation model; validation logits only as class histograms
                 (the baseline arms, logistic regressions on the NCCT markers, are scored here too)
  train.baseline the baseline arms' fitting: per-feature moments of the fit cases' markers, then
                 the summed log-loss, gradient and Hessian at the coordinator's coefficients

Each handler lives with its stage (client/segmentation.py, pretraining.py, synthesis.py,
classifier.py, baselines.py) over one `common/` function; client/messages.py holds what they share.
Every reply passes `check_reply`: model weights and aggregate scalars, nothing per patient.
Aggregates of fewer than min-aggregate-cases cases are withheld (counts and `withheld` = 1 only),
and a site scores at most max-cls-scorings classifier models per run.
A handler's exception leaves the site only as its class, a short code and a digest (`client/errors.py`).
"""

from __future__ import annotations

from importlib import import_module

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.errors import site_errors
from client.messages import reply
from client.site import site_from_context

app = ClientApp(mods=[site_errors])


def handler(module: str, name: str):
    """The handler `name` of client/<module>.py, imported when its first message arrives: a
    deployed SuperNode starts a fresh process per message, which then loads only that stage's stack."""

    def handle(message: Message, context: Context) -> Message:
        return getattr(import_module(f"client.{module}"), name)(message, context)

    handle.__name__ = name
    return handle


@app.query("info")
def info(message: Message, context: Context) -> Message:
    site = site_from_context(context.node_config, context.run_config)
    return reply(message, RecordDict({"info": ConfigRecord({"center": site.center}),
                                      "metrics": MetricRecord(site.info())}))


app.train("seg")(handler("segmentation", "train_seg"))
app.evaluate("seg")(handler("segmentation", "evaluate_seg"))
app.train("ssl")(handler("pretraining", "train_ssl"))
app.evaluate("ssl")(handler("pretraining", "evaluate_ssl"))
app.query("synth")(handler("synthesis", "synthesize"))
app.train("cls")(handler("classifier", "train_cls"))
app.train("cls_alone")(handler("classifier", "train_cls_alone"))
app.evaluate("cls")(handler("classifier", "evaluate_cls"))
app.train("baseline")(handler("baselines", "train_baseline"))
