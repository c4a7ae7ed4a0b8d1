"""On-site synthesis of hematoma-expansion (HE) ROIs: Diffusion-UKAN, with memorization and quality audits.

    from common.synthesis import synthesis_settings, train_generator, sample, memorization_audit, synthetic_needed
    settings = synthesis_settings(load_profile("cpu"), ratio="1:2", generator="ukan")
    trained = train_generator(he_rois, settings, seed=0)          # (N, C, P, P) in [0, 1]
    candidates = sample(trained, n=40, seed=1)                      # DDIM, deterministic per seed
    audit = memorization_audit(candidates, he_rois, groups=case_ids)  # audit["accepted"]: bool (n,)

Modules: ``settings`` (the profile's [synthesis] section), ``diffusion`` (DDPM training with MONAI's
DDPMScheduler, DDIM sampling, the U-KAN and MONAI UNet generators), ``ratio`` (how many synthetic
samples reach HE:NHE), ``audit`` (memorization audit, feature distance, intensity statistics,
sample grid) and ``run`` (the `hemex synth` run for one centre).
"""

from common.synthesis.audit import feature_distance, intensity_stats, memorization_audit, save_sample_grid
from common.synthesis.diffusion import MonaiUNetDenoiser, TrainedGenerator, build_generator, sample, train_generator
from common.synthesis.ratio import parse_ratio, synthetic_needed
from common.synthesis.settings import GENERATORS, SynthesisSettings, synthesis_settings

__all__ = [
    "GENERATORS",
    "MonaiUNetDenoiser",
    "SynthesisSettings",
    "TrainedGenerator",
    "build_generator",
    "feature_distance",
    "intensity_stats",
    "memorization_audit",
    "parse_ratio",
    "sample",
    "save_sample_grid",
    "synthesis_settings",
    "synthetic_needed",
    "train_generator",
]
