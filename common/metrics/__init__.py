"""Evaluation metrics. ``segmentation``: per-case Dice, IoU, HD95 (mm) and volume errors (mL)."""

from common.metrics.segmentation import hd95, segmentation_metrics, summarize

__all__ = ["hd95", "segmentation_metrics", "summarize"]
