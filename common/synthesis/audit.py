"""Memorization audit and quality report for synthetic ROIs.

Memorization. A generator trained on a handful of HE cases can reproduce its training images, and
a reproduced image is a patient's scan leaving its privacy budget (it would be used and shown as
if it were synthetic). For every synthetic ROI we take the distance to its nearest real training
ROI and compare it with how close *independent patients* come to each other:

- distance: root-mean-square intensity difference over all channels and pixels (units: [0, 1]
  window intensity), minimised over small translations (+-`max_shift` px, on the central crop),
  so a shifted copy counts as a copy. When the generator trained with left-right flips, the
  mirrored training ROIs are in the reference set too.
- reference distribution: for every real training ROI, the distance to its nearest real ROI of
  *another case* (leave-one-case-out: the k ROIs of one case are neighbouring slices, or repeats
  when the hematoma spans fewer than k slices, and would make the distribution collapse to 0).
- threshold: the `percentile`-th (default 5th) percentile of that distribution. A real ROI of a
  new patient falls this close to some training patient only 5 % of the time, so a synthetic ROI
  closer than that resembles one training image more than patients resemble each other: it is
  rejected. By construction about `percentile` % of genuinely new images would also be rejected
  (the price of the test), while exact and near copies (distance ~ 0) are always caught.
  Limitations: pixel distances miss copies that are rotated, rescaled or intensity-shifted, and
  the percentile is only as good as the number of training cases behind it (10 cases -> ~30
  ROIs -> a coarse 5th percentile).

Quality. A sample grid beside real ROIs (PNG), a kernel distance (MMD) between real and synthetic sets
in the feature space of a FIXED, randomly initialised conv net (seeded; no downloaded weights:
Inception features would need a download, and random conv features are known to track low-level
statistics -- texture, contrast, edges -- but not anatomy or semantics, so they complement rather
than replace looking at the grid), and per-channel intensity statistics per group.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------

def _flat(images: np.ndarray, crop: int, dy: int = 0, dx: int = 0) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    h, w = x.shape[-2:]
    x = x[..., crop + dy: h - crop + dy, crop + dx: w - crop + dx]
    return x.reshape(x.shape[0], -1)


def nearest_distances(queries: np.ndarray, reference: np.ndarray, max_shift: int = 0,
                      exclude: np.ndarray | None = None, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each query image its RMS distance to the nearest reference image and that image's index.

    queries (n, C, H, W), reference (m, C, H, W). The query's central crop (borders of max_shift
    removed) is compared with the reference crop shifted by every (dy, dx) in [-max_shift,
    max_shift]^2. exclude: optional (n, m) boolean array of pairs to ignore (e.g. the same case).
    """
    queries = np.asarray(queries, np.float32)
    reference = np.asarray(reference, np.float32)
    n, m = len(queries), len(reference)
    best = torch.full((n, m), float("inf"))
    q = _flat(queries, max_shift)
    dim = q.shape[1]
    shifts = range(-max_shift, max_shift + 1)
    for dy in shifts:
        for dx in shifts:
            r = _flat(reference, max_shift, dy, dx)
            for start in range(0, n, chunk):
                d = torch.cdist(q[start:start + chunk].double(), r.double()).float() / np.sqrt(dim)
                best[start:start + chunk] = torch.minimum(best[start:start + chunk], d)
    if exclude is not None:
        best[torch.as_tensor(np.asarray(exclude, bool))] = float("inf")
    dist, index = best.min(dim=1)
    return dist.numpy().astype(np.float64), index.numpy()


def real_nn_distances(real: np.ndarray, groups=None, max_shift: int = 0) -> np.ndarray:
    """Leave-one-group-out nearest-neighbour distances among real images (group = case)."""
    real = np.asarray(real, np.float32)
    groups = np.arange(len(real)) if groups is None else np.asarray(groups)
    if len(np.unique(groups)) < 2:
        raise ValueError("the memorization audit needs real ROIs from at least two cases")
    same = groups[:, None] == groups[None, :]
    dist, _ = nearest_distances(real, real, max_shift, exclude=same)
    return dist


def memorization_audit(synthetic: np.ndarray, real: np.ndarray, groups=None, percentile: float = 5.0,
                       max_shift: int = 2, include_flips: bool = True) -> dict:
    """Accept/reject every synthetic image against the real training images.

    Returns a dict with the boolean `accepted` mask (n,), the per-sample `distance` and `nearest`
    (index into `real`), the `threshold`, the real leave-one-case-out distances and a JSON-able
    `summary`.
    """
    synthetic = np.asarray(synthetic, np.float32)
    real = np.asarray(real, np.float32)
    groups = np.arange(len(real)) if groups is None else np.asarray(groups)
    if synthetic.ndim != 4 or real.ndim != 4 or synthetic.shape[1:] != real.shape[1:]:
        raise ValueError(f"synthetic {synthetic.shape} and real {real.shape} must both be (N, C, H, W) alike")
    real_nn = real_nn_distances(real, groups, max_shift)
    if include_flips:
        # A flipped training image is as much a copy as the image itself. The reference
        # distribution stays the unflipped one: mirrored patients are not independent patients.
        reference = np.concatenate([real, real[..., ::-1]])
        reference_index = np.concatenate([np.arange(len(real)), np.arange(len(real))])
    else:
        reference, reference_index = real, np.arange(len(real))
    threshold = float(np.percentile(real_nn, percentile))
    if len(synthetic):
        dist, nearest = nearest_distances(synthetic, reference, max_shift)
        nearest = reference_index[nearest]
    else:
        dist, nearest = np.zeros(0), np.zeros(0, int)
    accepted = dist >= threshold
    summary = {
        "synthetic": int(len(synthetic)), "accepted": int(accepted.sum()), "rejected": int((~accepted).sum()),
        "rejected_fraction": float((~accepted).mean()) if len(synthetic) else 0.0,
        "threshold": threshold, "threshold_rule": f"{percentile:g}th percentile of real leave-one-case-out NN distances",
        "distance": "RMS intensity difference over channels and pixels, min over +-%d px shifts%s"
                    % (max_shift, " and left-right flips" if include_flips else ""),
        "real_training_rois": int(len(real)), "real_training_cases": int(len(np.unique(groups))),
        "real_nn_distance": _quantiles(real_nn),
        "synthetic_nn_distance": _quantiles(dist) if len(dist) else None,
        # Fraction of synthetic samples closer to the training set than the median real patient is
        # to its nearest other patient: ~0.5 for a generator that neither copies nor drifts away.
        "synthetic_closer_than_real_median": float((dist < np.median(real_nn)).mean()) if len(dist) else None,
        # Median synthetic-to-training distance over median patient-to-patient distance: ~1 for a
        # generator that makes new patients, -> 0 for one that copies, > 1 for one that drifts away.
        "nn_distance_ratio": float(np.median(dist) / np.median(real_nn)) if len(dist) and np.median(real_nn) > 0
        else None,
    }
    return {"accepted": accepted, "distance": dist, "nearest": nearest, "threshold": threshold,
            "real_nn": real_nn, "summary": summary}


def _quantiles(values: np.ndarray) -> dict:
    values = np.asarray(values, float)
    return {"min": float(values.min()), "p5": float(np.percentile(values, 5)), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "max": float(values.max())}


# ---------------------------------------------------------------------------------------------
# Feature-space distance (fixed random network)
# ---------------------------------------------------------------------------------------------

class RandomFeatureNet(nn.Module):
    """A fixed, randomly initialised conv net (seeded): 4 conv-ReLU-pool stages, then per-channel
    mean and standard deviation pooled over space -> (N, 2 * width * 4) features."""

    def __init__(self, in_channels: int, width: int = 32, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        ch = in_channels
        self.convs = nn.ModuleList()
        for level in range(4):
            out = width * (level + 1)
            conv = nn.Conv2d(ch, out, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * np.sqrt(2.0 / (ch * 9)))
                conv.bias.zero_()
            self.convs.append(conv)
            ch = out
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            feats.append(torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1))
            if i < len(self.convs) - 1 and min(x.shape[-2:]) >= 2:
                x = torch.nn.functional.avg_pool2d(x, 2)
        return torch.cat(feats, dim=1)


def random_features(images: np.ndarray, seed: int = 0, width: int = 32) -> np.ndarray:
    images = np.asarray(images, np.float32)
    net = RandomFeatureNet(images.shape[1], width, seed)
    x = torch.from_numpy(images) * 2.0 - 1.0
    return torch.cat([net(x[i:i + 128]) for i in range(0, len(x), 128)]).numpy().astype(np.float64)


def mmd2(features_a: np.ndarray, features_b: np.ndarray, bandwidth: float) -> float:
    """Unbiased squared maximum mean discrepancy with the Gaussian kernel exp(-|x - y|^2 / (2 h^2)).
    Bounded (<= 2), so a generator producing garbage gives a large but finite value."""
    a, b = np.asarray(features_a, float), np.asarray(features_b, float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")

    def kernel(x, y):
        d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
        return np.exp(-np.maximum(d2, 0.0) / (2 * bandwidth ** 2))

    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    m, n = len(a), len(b)
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
                 - 2 * k_ab.mean())


def precision_recall(real: np.ndarray, synthetic: np.ndarray, k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall of a synthetic set against a real one in a feature space
    (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around its points
    reaching their k-th nearest neighbour in the same set. Precision (fidelity) is the fraction of
    synthetic points inside the real manifold, recall (diversity) the fraction of real points inside
    the synthetic one. NaN when a set has k points or fewer."""
    real, synthetic = np.asarray(real, float), np.asarray(synthetic, float)
    if len(real) <= k or len(synthetic) <= k:
        return float("nan"), float("nan")

    def distances(a, b):
        return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0))

    def radii(a):  # distance to the k-th nearest other point (column 0 is the point itself)
        return np.sort(distances(a, a), axis=1)[:, k]

    cross = distances(synthetic, real)  # (n_synthetic, n_real)
    precision = (cross <= radii(real)[None, :]).any(axis=1).mean()
    recall = (cross.T <= radii(synthetic)[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def feature_distance(real: np.ndarray, synthetic: np.ndarray, seed: int = 0, holdout: np.ndarray | None = None,
                     splits: int = 20) -> dict:
    """MMD^2 between real and synthetic sets on fixed random-network features (standardised by the
    real features; Gaussian kernel with the median real-real distance as bandwidth), with
    reference values: `real_vs_real_halves` (two random halves of the real set: what two samples
    of the same distribution give at this size; smaller sets make every value noisier) and, when
    given, `real_vs_holdout` (real training vs other real HE ROIs: what a perfect generator reaches)."""
    fr = random_features(real, seed)
    mu, sd = fr.mean(0), fr.std(0)
    sd = np.maximum(sd, 0.1 * np.median(sd) + 1e-12)  # near-constant features must not dominate
    fr = (fr - mu) / sd
    fs = (random_features(synthetic, seed) - mu) / sd
    d2 = ((fr[:, None] - fr[None]) ** 2).sum(-1)
    bandwidth = float(np.sqrt(np.median(d2[np.triu_indices(len(fr), 1)]) / 2)) or 1.0
    rng = np.random.default_rng(seed)
    halves = []
    for _ in range(splits):
        perm = rng.permutation(len(fr))
        halves.append(mmd2(fr[perm[: len(fr) // 2]], fr[perm[len(fr) // 2:]], bandwidth))
    precision, recall = precision_recall(fr, fs)
    record = {"metric": "MMD^2 (Gaussian kernel, median-heuristic bandwidth, unbiased)",
              "features": "fixed random conv net (seed %d), per-stage channel mean/std; no pretrained weights" % seed,
              "real_vs_synthetic": mmd2(fr, fs, bandwidth), "real_vs_real_halves": float(np.nanmean(halves)),
              "real_vs_real_halves_q95": float(np.nanpercentile(halves, 95)),
              "n_real": int(len(fr)), "n_synthetic": int(len(fs)),
              # Same feature space: fidelity and diversity (3-NN manifolds), which MMD^2 mixes.
              "precision": precision, "recall": recall}
    if holdout is not None and len(holdout) >= 2:
        record["real_vs_holdout"] = mmd2(fr, (random_features(holdout, seed) - mu) / sd, bandwidth)
    return record


REALISM_RULE = ("synthetic HE ROIs are used only if their MMD^2 to the site's real HE ROIs is at most the larger of "
                 "(a) the MMD^2 between the site's real NHE and real HE ROIs and (b) the 95th percentile of the MMD^2 "
                 "between random halves of the real HE ROIs")


def realism_verdict(distance: dict) -> dict:
    """Whether synthetic ROIs are realistic enough to train on, from a `feature_distance` record
    with `real_nhe_vs_real_he` added.

    Why this rule: a synthetic HE ROI that sits farther from real HE ROIs than the site's own real
    NHE ROIs do differs from real data more than the two classes differ from each other, so a
    classifier trained on it learns "synthetic vs real" rather than "HE vs NHE". The sampling noise
    of MMD^2 at this size (random halves of the real set) is the floor, so a generator is not
    rejected for noise when the classes are close. `passed` is None when the distances could not
    be measured (fewer than two ROIs in a group): nothing to judge, the samples are kept.
    """
    synthetic = distance.get("real_vs_synthetic", float("nan"))
    scales = [v for v in (distance.get("real_nhe_vs_real_he"), distance.get("real_vs_real_halves_q95"))
              if v is not None and np.isfinite(v)]
    threshold = max(scales) if scales else float("nan")
    passed = None if not (np.isfinite(synthetic) and np.isfinite(threshold)) else bool(synthetic <= threshold)
    return {"passed": passed, "mmd2_synthetic": float(synthetic), "mmd2_threshold": float(threshold),
            "rule": REALISM_RULE}


# ---------------------------------------------------------------------------------------------
# Intensity statistics and sample grid
# ---------------------------------------------------------------------------------------------

def intensity_stats(images: np.ndarray, channel_names=None) -> dict:
    """Per-channel mean, SD and percentiles of [0, 1] intensities, and the fraction of bright
    pixels (> 0.5) per image (in the blood window: roughly the hematoma area fraction)."""
    images = np.asarray(images, np.float32)
    if len(images) == 0:
        return {}
    names = list(channel_names or [f"ch{i}" for i in range(images.shape[1])])
    stats = {}
    for c, name in enumerate(names[: images.shape[1]]):
        values = images[:, c]
        bright = (values > 0.5).reshape(len(values), -1).mean(axis=1)
        stats[name] = {"mean": float(values.mean()), "sd": float(values.std()),
                       "p5": float(np.percentile(values, 5)), "p50": float(np.percentile(values, 50)),
                       "p95": float(np.percentile(values, 95)),
                       "per_image_sd": float(values.reshape(len(values), -1).std(axis=1).mean()),
                       "bright_fraction": float(bright.mean())}
    return stats


def save_sample_grid(path, real: np.ndarray, synthetic: np.ndarray, rejected: np.ndarray | None = None,
                     rejected_nearest: np.ndarray | None = None, channel: int = 0, columns: int = 8,
                     channel_name: str = "brain window", title: str = "") -> None:
    """PNG: rows of real ROIs, rows of accepted synthetic ROIs, and (when any) rejected synthetic
    ROIs each above its nearest training ROI. Written to a temporary name, then renamed."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [("real training HE ROIs", np.asarray(real)[: 2 * columns]),
                ("synthetic, accepted", np.asarray(synthetic)[: 2 * columns])]
    if rejected is not None and len(rejected):
        k = min(columns, len(rejected))
        sections.append(("synthetic, rejected by the audit", np.asarray(rejected)[:k]))
        sections.append(("... their nearest training ROI", np.asarray(rejected_nearest)[:k]))
    rows = sum(max(1, int(np.ceil(len(s) / columns))) for _, s in sections)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.25 + 0.6), squeeze=False)
    row = 0
    for label, images in sections:
        n_rows = max(1, int(np.ceil(len(images) / columns)))
        for i in range(n_rows * columns):
            ax = axes[row + i // columns, i % columns]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i < len(images):
                ax.imshow(images[i, channel], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[row, 0].set_title(f"{label} ({len(images)})", loc="left", fontsize=8)
        row += n_rows
    fig.suptitle(title or f"ROIs, {channel_name}", fontsize=9)
    fig.tight_layout()
    path = str(path)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
