"""Delivered hematoma masks kept on a site's own disk, keyed by everything they depend on: the
segmentation weights, the inference settings and the case's files.

A held-out centre segments every case twice in a study: once to score the segmentation (the
delivered Dice), once to cut the classifier's ROIs on the same masks. The first pass stores each
delivered mask here and the second reads it back, so the site does not run sliding-window
inference again (and the classifier sees exactly the masks whose Dice was reported). Masks are
site-private: they are never sent anywhere.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from common.data.contract import Case
from common.data.dataset import update_with_case
from common.files import write_npz

MASK_FORMAT = 1  # bump when the delivered-mask computation changes


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode())
        h.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return h.hexdigest()


class DeliveredMasks:
    """The delivered masks of one segmentation model (its weights and inference settings) at a site."""

    def __init__(self, root: Path, state: Mapping[str, torch.Tensor], settings: dict):
        h = hashlib.sha256(json.dumps([MASK_FORMAT, settings], sort_keys=True, default=list).encode())
        h.update(weights_digest(state).encode())
        self.dir = Path(root) / h.hexdigest()[:24]

    def path(self, case: Case) -> Path:
        h = hashlib.sha256()
        update_with_case(h, case)
        return self.dir / f"{case.center}-{case.case_id}-{h.hexdigest()[:20]}.npz"

    def get(self, case: Case) -> np.ndarray | None:
        """The stored mask (uint8, on the case's own grid), or None when absent or unreadable."""
        path = self.path(case)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return data["mask"].astype(np.uint8, copy=False)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None  # a damaged entry is recomputed, never trusted

    def put(self, case: Case, mask: np.ndarray) -> None:
        write_npz(self.path(case), {"case": f"{case.center}/{case.case_id}"}, mask=np.asarray(mask, np.uint8))
