"""HE classification: ROI datasets, ViT training, calibration and the `hemex train-cls` run.

Pieces, each usable on its own (a Flower client uses rois, training and prediction); import them
from their modules:

* ``settings``: ``ClassifierSettings`` (the profile's [classifier] section) and ``create_model``.
* ``rois``: ``build_roi_dataset(cases, settings, mask_provider=...)``: hematoma ROIs (and marker
  features) for a list of cases, with every case it could not use listed with the reason. The mask
  comes from a *mask provider*, ``Callable[[Sample], ndarray | None]``: the reference mask by
  default (``reference_mask``), or a segmentation model's prediction (any callable returning a
  (z, y, x) mask on the sample's grid), so the classifier can be fed by the federated U-Mamba.
  Also ``stratified_split`` (fit / held-out per centre and label) and the per-case network input.
* ``training``: ``train_classifier(model, train_rois, budget, seed, extra_he_rois=None,
  proximal_mu=0, global_params=None)``: trains a ViT in place for a budget of epochs / steps /
  seconds and returns the weights and flat metrics. Slice-level training: every ROI slice carries
  its case's label. Class imbalance: BCE with ``pos_weight`` = negatives / positives over the
  slices actually trained on (so it tends to 1 once synthetic HE ROIs rebalance the set), or a
  class-balanced sampler. Augmentation: flips, small rotations and shifts, a HU calibration offset,
  Gaussian noise. Optional auxiliary loss (``aux_weight``): every slice also regresses its case's
  marker features (volume, density, shape), label-free targets available for every case.
* ``prediction``: ``case_logits(model, rois)``: the patient-level score = **mean of the k slice
  logits** (test-time flips averaged too). Mean logits (a geometric mean of odds) rather than mean
  probabilities, so one confident slice cannot dominate and the score stays on the scale Platt
  scaling expects.
* ``calibration``: ``fit_calibration(logits, y)``: Platt scaling (a, b: p = sigmoid(a z + b)) or a
  temperature, fitted on held-out cases of the *training* centres only.
* ``storage``: ``save_classifier`` / ``load_classifier`` (weights in safetensors, record in JSON).
* ``oracle``: truth.csv of synthetic cohorts, read for evaluation only.
* ``train_cls``: ``run_train_cls(...)``, the central run behind ``hemex train-cls``.
"""
