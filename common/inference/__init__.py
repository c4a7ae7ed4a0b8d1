"""Inference: whole-volume segmentation by sliding windows (``segmentation``) and its
post-processing (``postprocess``), portable model bundles (``bundle``), `hemex predict` on NIfTI /
DICOM (``predict``), DICOM SEG output and where the classifier looked (``saliency``)."""
