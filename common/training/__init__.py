"""Model training. ``segmentation``: hematoma segmentation for central runs and federated rounds.

    from common.training.segmentation import train_segmentation
    result = train_segmentation(model, train_samples, epochs=1, steps_per_epoch=50, patch_size=(16, 64, 64))

Submodules: ``settings`` (profile [segmentation] section), ``patches`` (foreground-oversampled
patches), ``augment``, ``losses`` (deep-supervised DiceCE, FedProx term), ``evaluation``, ``checkpoint``
(safetensors + architecture JSON), ``central`` (the `hemex train-seg` run), ``privacy`` (DP-SGD)
and ``classification`` (the HE classifier). Whole-volume prediction and its post-processing live
in ``common.inference``. The package imports no submodule itself: a ClientApp process that only
reads scans does not pay for MONAI and the networks.
"""
