"""Model training. ``segmentation``: hematoma segmentation for central runs and federated rounds.

    from common.training import train_segmentation, evaluate_segmentation
    result = train_segmentation(model, train_samples, epochs=1, steps_per_epoch=50, patch_size=(16, 64, 64))

Submodules: ``settings`` (profile [segmentation] section), ``patches`` (foreground-oversampled
patches), ``augment``, ``losses`` (deep-supervised DiceCE, FedProx term), ``evaluation``, ``checkpoint``
(safetensors + architecture JSON) and ``central`` (the `hemex train-seg` run). Whole-volume
prediction and its post-processing live in ``common.inference``.
"""

from common.training.checkpoint import architecture, build_model, load_checkpoint, save_checkpoint
from common.training.evaluation import evaluate_segmentation
from common.inference.segmentation import check_volume, predict_mask, predict_probabilities
from common.training.segmentation import TrainResult, train_segmentation
from common.training.settings import SegmentationSettings

__all__ = [
    "SegmentationSettings",
    "TrainResult",
    "architecture",
    "build_model",
    "check_volume",
    "evaluate_segmentation",
    "load_checkpoint",
    "predict_mask",
    "predict_probabilities",
    "save_checkpoint",
    "train_segmentation",
]
