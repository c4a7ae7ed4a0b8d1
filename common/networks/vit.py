"""The HE classifier: a timm Vision Transformer on hematoma ROIs, built by name.

    from common.networks.vit import create_classifier
    model = create_classifier("vit-tiny-roi", img_size=64, patch_size=8, in_chans=4)
    logits = model(rois)          # (B, in_chans, 64, 64) -> (B, 1): one HE logit per ROI

Named presets are timm ``VisionTransformer`` configurations sized for ROIs (the paper-scale
``vit-base`` is ViT-B/16 at 224 px); any other name is passed to ``timm.create_model`` (e.g.
``vit_small_patch16_224``). Weights are never downloaded (``pretrained=False`` always); a local
weight file (safetensors or a torch state dict, e.g. ImageNet weights a site copied by hand) can
initialise the network: the patch embedding is adapted to the channel count, position
embeddings are resampled to the grid, and the classification head is skipped when its shape
differs. The model outputs one logit (``num_classes=1``, HE vs no HE).

``stem="conv"`` replaces the single strided patch-projection convolution by a small
convolutional stem (stride-2 3x3 convolutions with GroupNorm and GELU, then a 1x1 projection;
Xiao et al., "Early convolutions help transformers see better", NeurIPS 2021). The transformer
is unchanged (same tokens, position embeddings, blocks and head); the stem makes optimisation
much more stable and sample-efficient when a ViT is trained from scratch on a few hundred
cases, which is the situation here. GroupNorm rather than BatchNorm keeps the model valid for
federated averaging and for Opacus. ``stem="patch"`` is the plain ViT.

``marker_inputs=M`` (> 0) wraps the ViT in ``MarkerFusion``: a linear path from the case's M
quantitative NCCT markers (volume, density, heterogeneity, hypodensity, shape; measured on the
hematoma mask, see ``common.metrics.markers``) is added to the HE logit, ``model(rois, markers)``.
A wide-and-deep design: with ~100 training cases a ViT alone learns the image evidence slowly,
while the markers carry most of what is known to predict expansion; the linear path starts at
zero, so the fused model begins as the plain ViT and lets training weigh the two.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError, DataError

# Presets: timm VisionTransformer keyword arguments (img_size / patch_size / in_chans come from
# the profile). "tiny" follows DeiT-Ti's width (192, 3 heads) with half the depth: ROIs are small
# and the cohorts hold hundreds, not millions, of cases.
CLASSIFIER_PRESETS: dict[str, dict] = {
    "vit-micro-roi": {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 3.0},
    "vit-tiny-roi": {"embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0},
    "vit-small-roi": {"embed_dim": 384, "depth": 8, "num_heads": 6, "mlp_ratio": 4.0},
    "vit-base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
}
DEFAULTS = {"img_size": 64, "patch_size": 8, "in_chans": 3, "num_classes": 1, "drop_rate": 0.1,
            "drop_path_rate": 0.1, "attn_drop_rate": 0.0, "global_pool": "token", "class_token": True,
            "stem": "patch", "marker_inputs": 0}
STEMS = ("patch", "conv")


def conv_stem_embed(stem_width: int = 0):
    """A timm ``embed_layer`` whose projection is a convolutional stem of total stride patch_size
    (a power of two): log2(patch_size) stride-2 3x3 conv + GroupNorm + GELU, then 1x1 to embed_dim."""
    from timm.layers import PatchEmbed

    class ConvStemEmbed(PatchEmbed):
        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, **kwargs):
            super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                             bias=bias, **kwargs)
            stride = self.patch_size[0]
            levels = int(round(math.log2(stride)))
            if 2**levels != stride or self.patch_size[0] != self.patch_size[1]:
                raise ConfigError(f"the conv stem needs a square power-of-two patch_size, got {patch_size}")
            width = stem_width or max(embed_dim // 2 ** levels, 16)
            layers, channels = [], in_chans
            for i in range(levels):
                out = min(width * 2**i, embed_dim)
                groups = math.gcd(out, 8)
                layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, out),
                           nn.GELU()]
                channels = out
            layers.append(nn.Conv2d(channels, embed_dim, 1, bias=bias))
            self.proj = nn.Sequential(*layers)

    return ConvStemEmbed


def list_classifiers() -> list[str]:
    return sorted(CLASSIFIER_PRESETS)


def classifier_config(name: str = "vit-tiny-roi", **overrides) -> dict:
    """The resolved keyword arguments of ``create_classifier(name, **overrides)`` (a JSON-able record)."""
    config = dict(DEFAULTS)
    if name in CLASSIFIER_PRESETS:
        config.update(CLASSIFIER_PRESETS[name])
    config.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(config["img_size"], (list, tuple)):
        config["img_size"] = int(config["img_size"][0])
    img, patch = int(config["img_size"]), int(config["patch_size"])
    if img < 1 or patch < 1 or img % patch:
        raise ConfigError(f"classifier img_size {img} must be a positive multiple of patch_size {patch}")
    if "embed_dim" in config and "num_heads" in config and config["embed_dim"] % config["num_heads"]:
        raise ConfigError(f"classifier embed_dim {config['embed_dim']} must be divisible by num_heads {config['num_heads']}")
    if int(config["in_chans"]) < 1 or int(config["num_classes"]) < 1:
        raise ConfigError("classifier in_chans and num_classes must be >= 1")
    if int(config["marker_inputs"]) < 0:
        raise ConfigError(f"classifier marker_inputs must be >= 0, got {config['marker_inputs']}")
    if config["stem"] not in STEMS:
        raise ConfigError(f"classifier stem {config['stem']!r} is not one of {', '.join(STEMS)}")
    return config


def create_classifier(name: str = "vit-tiny-roi", *, weights: str | Path | None = None, **overrides) -> nn.Module:
    """A timm Vision Transformer with ``pretrained=False``, optionally initialised from a local file.

    Args:
        name: a preset (``list_classifiers()``) or any timm model name.
        weights: optional local safetensors / torch state-dict file (never a hub download).
        overrides: timm keyword arguments, e.g. ``img_size=64, patch_size=8, in_chans=4``.
    """
    config = classifier_config(name, **overrides)
    stem, n_markers = config.pop("stem"), int(config.pop("marker_inputs"))
    if stem == "conv":
        config["embed_layer"] = conv_stem_embed()
    if name in CLASSIFIER_PRESETS:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**config)
    else:
        import timm

        if name not in timm.list_models():
            raise ConfigError(f"unknown classifier {name!r}; presets: {', '.join(list_classifiers())}, or a timm model name")
        try:
            model = timm.create_model(name, pretrained=False, **config)
        except TypeError as err:
            raise ConfigError(f"classifier {name!r} does not accept these settings: {err}") from err
    if weights:
        load_local_weights(model, weights)
    return MarkerFusion(model, n_markers) if n_markers > 0 else model


class MarkerFusion(nn.Module):
    """A classifier whose HE logit (output 0) is the ViT's plus a linear function of the case's
    scaled marker vector; further outputs (auxiliary heads) are the ViT's unchanged."""

    def __init__(self, backbone: nn.Module, marker_inputs: int):
        super().__init__()
        self.backbone = backbone
        self.marker_inputs = int(marker_inputs)
        self.markers = nn.Linear(self.marker_inputs, 1, bias=False)  # the ViT head holds the bias
        nn.init.zeros_(self.markers.weight)

    def forward(self, x: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
        if markers.shape != (x.shape[0], self.marker_inputs):
            raise DataError("marker input", f"expected ({x.shape[0]}, {self.marker_inputs}) marker values, "
                            f"got {tuple(markers.shape)}")
        out = self.backbone(x)
        return torch.cat([out[:, :1] + self.markers(markers.to(out.dtype)), out[:, 1:]], dim=1)


def marker_inputs(model: nn.Module) -> int:
    """How many marker values `model` takes besides the ROI (0 for a plain ViT)."""
    return int(getattr(model, "marker_inputs", 0))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(path, "classifier weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged or foreign files raise library-specific errors
        raise DataError(path, f"cannot read classifier weights: {str(err).splitlines()[0]}") from err
    for key in ("state_dict", "model", "model_state"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DataError(path, "classifier weight file does not hold a state dict")
    return state


def adapt_state(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit a ViT state dict to ``model``: resample position embeddings to the token grid, adapt the
    patch embedding to the channel count (mean over RGB, repeated), drop mismatching heads.
    Returns the adapted state and notes on what was changed or skipped."""
    from timm.layers import resample_abs_pos_embed

    target = model.state_dict()
    state, notes = copy.copy(state), []
    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = list(model.patch_embed.grid_size)
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], grid, num_prefix_tokens=prefix)
        notes.append(f"pos_embed resampled to {grid[0]}x{grid[1]}")
    key = "patch_embed.proj.weight"
    if key in state and key in target and state[key].shape != target[key].shape:
        src, dst = state[key], target[key]
        if src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
            mean = src.mean(dim=1, keepdim=True)
            state[key] = mean.repeat(1, dst.shape[1], 1, 1) * (src.shape[1] / dst.shape[1])
            notes.append(f"patch embedding adapted from {src.shape[1]} to {dst.shape[1]} channels")
        elif src.shape[0] == dst.shape[0]:
            resized = torch.nn.functional.interpolate(src.mean(dim=1, keepdim=True), size=dst.shape[2:],
                                                      mode="bicubic", align_corners=False)
            state[key] = resized.repeat(1, dst.shape[1], 1, 1) * (src.shape[1] / dst.shape[1])
            notes.append(f"patch embedding resized to {tuple(dst.shape[2:])} and {dst.shape[1]} channels")
    for k in list(state):
        if k in target and state[k].shape != target[k].shape:
            notes.append(f"skipped {k}: shape {tuple(state[k].shape)} vs {tuple(target[k].shape)}")
            del state[k]
    return state, notes


def load_local_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise ``model`` from a local file (non-strict after adaptation); returns notes.
    Raises DataError when almost nothing fits (a file for another architecture)."""
    path = Path(path)
    state, notes = adapt_state(_read_state(path), model)
    result = model.load_state_dict(state, strict=False)
    target = model.state_dict()
    loaded = len(target) - len(result.missing_keys)
    if loaded < 0.5 * len(target):
        raise DataError(path, f"only {loaded} of {len(target)} classifier tensors fit this architecture")
    notes += [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    return notes


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
