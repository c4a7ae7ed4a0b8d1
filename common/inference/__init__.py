"""Clinical inference: portable model bundles (checksummed) and `hemex predict` on NIfTI / DICOM."""
