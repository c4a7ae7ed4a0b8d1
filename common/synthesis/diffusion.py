"""Diffusion-style generative training and sampling of 2D ROIs, with a U-KAN or a MONAI UNet denoiser.

    from common.synthesis.diffusion import build_generator, train_generator, sample
    trained = train_generator(he_rois, settings, seed=0)           # (N, C, P, P) in [0, 1]
    synthetic = sample(trained, n=40, seed=1)                        # (40, C, P, P) in [0, 1]

Images are scaled to [-1, 1]. Each training step draws a batch (with optional left-right flips),
times and noise, and regresses the objective's target (MSE); AdamW with a short warm-up, gradient
clipping at 1, and an exponential moving average (EMA) of the weights, which is what samples.

Objectives (`settings.objective`):
- "flow" (default): rectified flow / flow matching (MONAI RFlowScheduler): x_t = (1 - s) x0 + s eps
  at s = t / T, the network predicts the velocity x0 - eps, and sampling integrates it with Euler
  steps from noise to data. Chosen by measurement (bench/synth_bench.py): at the CPU profile's
  budget it is the only objective whose samples reach the realism gate.
- "epsilon": DDPM noise prediction (linear betas 1e-4..0.02, T = 1000; Ho et al. 2020), DDIM sampling.
- "v": DDPM v-prediction (Salimans & Ho 2022), DDIM sampling.
DDIM is written out (see `_ddim_sample`) with the original "leading" spacing T // n * [n-1, ..., 0];
eta = 0 makes it deterministic given the initial noise, which comes from a seeded generator.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.synthesis.settings import SynthesisSettings


class MonaiUNetDenoiser(nn.Module):
    """MONAI `DiffusionModelUNet` (2D, no attention in the resolution levels; MONAI always puts one
    self-attention block at the bottleneck) behind the denoiser call convention
    `model(x, timesteps, class_labels=None)`."""

    def __init__(self, in_channels: int, channels=(16, 32, 64), num_classes: int | None = None,
                 out_channels: int | None = None):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        channels = tuple(int(c) for c in channels)
        self.num_classes = num_classes
        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=out_channels or in_channels, channels=channels,
            attention_levels=(False,) * len(channels), num_res_blocks=1, norm_num_groups=8,
            num_head_channels=min(32, channels[-1]), num_class_embeds=num_classes)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.unet.block_out_channels) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if timesteps.numel() == 1 and x.shape[0] > 1:
            timesteps = timesteps.expand(x.shape[0])
        if self.num_classes and class_labels is None:
            raise ValueError("the class-conditional MONAI UNet needs class_labels")
        return self.unet(x, timesteps, class_labels=None if class_labels is None else class_labels.long())


def build_generator(settings: SynthesisSettings, channels: int, num_classes: int | None = None,
                    condition_channels: int = 0) -> nn.Module:
    """The denoiser named by `settings.generator` ('ukan' or 'unet') for images of `channels`
    channels; `condition_channels` more are concatenated to its input (they are given, not generated)."""
    in_channels = channels + condition_channels
    if settings.generator == "ukan":
        from common.networks.ukan_diffusion import UKANDenoiser

        return UKANDenoiser(in_channels, channels, base_channels=settings.base_channels,
                            channel_mult=settings.channel_mult, kan_levels=settings.kan_levels,
                            kan_layers=settings.kan_layers, grid_size=settings.grid_size,
                            spline_order=settings.spline_order, num_classes=num_classes)
    if settings.generator == "unet":
        return MonaiUNetDenoiser(in_channels, settings.unet_channels, num_classes, out_channels=channels)
    raise ConfigError(f"unknown generator {settings.generator!r}; choose ukan or unet")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def noise_scheduler(settings: SynthesisSettings):
    """The training-time noise process of `settings.objective`: MONAI's RFlowScheduler (continuous
    time, logit-normal times, velocity target) or DDPMScheduler (linear betas)."""
    if settings.objective == "flow":
        from monai.networks.schedulers import RFlowScheduler

        return RFlowScheduler(num_train_timesteps=settings.num_train_timesteps, use_discrete_timesteps=False,
                              sample_method="logit-normal")
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=settings.num_train_timesteps, schedule="linear_beta",
                         beta_start=settings.beta_start, beta_end=settings.beta_end,
                         prediction_type="v_prediction" if settings.objective == "v" else "epsilon", clip_sample=True)


def training_batch(scheduler, settings: SynthesisSettings, clean: torch.Tensor, generator: torch.Generator):
    """(noisy input, timesteps, regression target) for a batch of clean images in [-1, 1]; every
    random draw comes from `generator` (on the CPU) so a seed gives the same batch on any device."""
    noise = torch.randn(clean.shape, generator=generator)
    n, T = clean.shape[0], settings.num_train_timesteps
    if settings.objective == "flow":
        # Logit-normal times (MONAI's "logit-normal" sample_method, drawn here from our generator):
        # most weight on mid-way noise levels, where the velocity is hardest to predict.
        timesteps = torch.sigmoid(torch.randn(n, generator=generator)) * T
        return scheduler.add_noise(clean, noise, timesteps), timesteps, clean - noise
    timesteps = torch.randint(0, T, (n,), generator=generator)
    noisy = scheduler.add_noise(original_samples=clean, noise=noise, timesteps=timesteps)
    target = scheduler.get_velocity(clean, noise, timesteps) if settings.objective == "v" else noise
    return noisy, timesteps, target


def _flow_sample(model, x: torch.Tensor, settings: SynthesisSettings, steps: int, labels, device) -> torch.Tensor:
    """Euler integration of the learnt velocity from pure noise (t = T) to data (t = 0)."""
    from monai.networks.schedulers import RFlowScheduler

    scheduler = RFlowScheduler(num_train_timesteps=settings.num_train_timesteps, use_discrete_timesteps=False)
    scheduler.set_timesteps(steps)
    times = scheduler.timesteps.float()
    for t, t_next in zip(times, torch.cat([times[1:], torch.zeros(1)])):
        velocity = model(x.to(device), t.reshape(1).expand(len(x)).to(device), labels).cpu().float()
        x, _ = scheduler.step(velocity, t, x, t_next)
    return x


def _ddim_sample(model, x: torch.Tensor, settings: SynthesisSettings, steps: int, eta: float, labels, device,
                 generator: torch.Generator) -> torch.Tensor:
    """DDIM (Song et al. 2021) with the original "leading" spacing T // n * [n-1, ..., 0].

    Written out rather than MONAI's DDIMScheduler.step, which clips the predicted x0 to [-1, 1] but
    keeps the model's raw noise estimate for the direction term: the two then disagree and an
    imperfect model's error is amplified at every step (measured: feature MMD^2 1.36 with it,
    0.50 with the noise re-derived from the clipped x0, same weights, 200 training steps).
    """
    alphas = noise_scheduler(settings).alphas_cumprod
    times = torch.arange(steps - 1, -1, -1, dtype=torch.long) * (settings.num_train_timesteps // steps)
    for i, t in enumerate(times):
        a_t = alphas[t]
        a_prev = alphas[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0)
        out = model(x.to(device), t.reshape(1).expand(len(x)).to(device), labels).cpu().float()
        if settings.objective == "v":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        else:
            x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator)
    return x


@dataclass
class TrainedGenerator:
    """A trained denoiser (the EMA weights, in eval mode) and how its training went."""

    model: nn.Module
    settings: SynthesisSettings
    image_shape: tuple[int, int, int]  # (C, P, P) of what it generates
    num_classes: int | None
    condition_channels: int = 0  # channels given to it at every step (the mask, with mask_condition)
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    stopped_early: bool = False
    cached: bool = False  # loaded from the site's generator cache (common/synthesis/cache.py), not trained now

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def seconds_per_step(self) -> float:
        # The median ignores the first steps' allocator warm-up.
        return float(np.median(self.step_seconds)) if self.step_seconds else float("nan")

    def summary(self) -> dict:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {"generator": self.settings.generator, "parameters": count_parameters(self.model),
                "steps": self.steps, "stopped_early_by_time_budget": self.stopped_early, "cached": self.cached,
                "seconds_per_step": self.seconds_per_step, "train_seconds": float(sum(self.step_seconds)),
                "final_loss": float(np.mean(tail)) if tail else float("nan"),
                "first_loss": float(self.losses[0]) if self.losses else float("nan")}


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def train_generator(images: np.ndarray, settings: SynthesisSettings, seed: int = 0, labels: np.ndarray | None = None,
                    progress: Callable[[int, int, float], None] | None = None, device="cpu",
                    checkpoints: Callable[[int, "TrainedGenerator"], None] | None = None) -> TrainedGenerator:
    """Train a denoiser with `settings.objective` on `images` (N, C, P, P) float in [0, 1].

    With `settings.mask_condition` the last channel (the hematoma mask) is not generated: it is
    given to the denoiser beside the noisy image, which learns the HU windows around a given shape.
    labels: None (unconditional) or (N,) ints in {0, 1} for a class-conditional model.
    progress: called as progress(step, total, loss) after every step.
    checkpoints: called as checkpoints(step, trained_so_far) after every step (the EMA model in eval
    mode; leave it as found): learning curves sample from it (bench/synth_bench.py --curve).
    device: where the network trains; random draws stay on the CPU (seeded), so a seed gives the
    same batches, noise and timesteps on any device.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be (N, C, P, P) with N >= 1, got {images.shape}")
    n, channels, height, width = images.shape
    condition_channels = 1 if settings.mask_condition else 0
    channels -= condition_channels
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    num_classes = None
    y = None
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if y.shape != (n,):
            raise ValueError(f"labels must be ({n},), got {tuple(y.shape)}")
        num_classes = int(y.max()) + 1 if n else 2
        num_classes = max(num_classes, 2)
    model = build_generator(settings, channels, num_classes, condition_channels).to(device)
    multiple = getattr(model, "size_multiple", 1)
    if height % multiple or width % multiple:
        raise ConfigError(f"ROI size {height}x{width} must be divisible by {multiple} for this generator")
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    scheduler = noise_scheduler(settings)
    data = torch.from_numpy(images) * 2.0 - 1.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, settings.warmup_steps)
    lr_lambda = lambda step: min(1.0, (step + 1) / warmup)  # noqa: E731
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    result = TrainedGenerator(ema, settings, (channels, height, width), num_classes, condition_channels)
    start = time.perf_counter()
    model.train()
    for step in range(settings.train_steps):
        t0 = time.perf_counter()
        index = torch.randint(0, n, (settings.batch_size,), generator=generator)
        batch = data[index]
        if settings.hflip:
            flip = torch.rand(settings.batch_size, generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        batch, condition = batch[:, :channels], batch[:, channels:]
        noisy, timesteps, target = training_batch(scheduler, settings, batch, generator)
        if condition_channels:
            noisy = torch.cat([noisy, condition], dim=1)
        prediction = model(noisy.to(device), timesteps.to(device), None if y is None else y[index].to(device))
        loss = F.mse_loss(prediction, target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        # EMA with a warm-up of the decay (1 + s) / (10 + s): early weights are forgotten fast.
        _ema_update(ema, model, min(settings.ema_decay, (1 + step) / (10 + step)))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"diffusion training diverged at step {step} (loss {value})")
        result.losses.append(value)
        result.step_seconds.append(time.perf_counter() - t0)
        if progress is not None:
            progress(step + 1, settings.train_steps, value)
        if checkpoints is not None:
            checkpoints(step + 1, result)
        if settings.max_train_seconds > 0 and time.perf_counter() - start > settings.max_train_seconds:
            result.stopped_early = step + 1 < settings.train_steps
            break
    return result


@torch.no_grad()
def sample(trained: TrainedGenerator | nn.Module, n: int, seed: int = 0, settings: SynthesisSettings | None = None,
           image_shape: tuple[int, int, int] | None = None, class_label: int | None = None,
           steps: int | None = None, eta: float | None = None, batch_size: int | None = None,
           progress: Callable[[int, int], None] | None = None, conditions: np.ndarray | None = None) -> np.ndarray:
    """Generate `n` images (n, C, P, P) float32 in [0, 1] (Euler steps for flow, DDIM otherwise).

    Deterministic for a given seed (eta = 0 and seeded initial noise). For a class-conditional
    model, class_label defaults to 1 (HE). A mask-conditioned generator needs `conditions`
    (n, 1, P, P) in [0, 1], the masks to generate around; the result is the generated channels only.
    """
    condition_channels = 0
    if isinstance(trained, TrainedGenerator):
        model, settings = trained.model, settings or trained.settings
        image_shape = image_shape or trained.image_shape
        condition_channels = trained.condition_channels
        if trained.num_classes and class_label is None:
            class_label = 1
    else:
        model = trained
        if settings is None or image_shape is None:
            raise ValueError("pass settings and image_shape when sampling from a bare model")
    if condition_channels:
        if conditions is None or np.shape(conditions) != (n, condition_channels, *image_shape[1:]):
            raise ValueError(f"this generator is mask-conditioned: pass conditions of shape "
                             f"{(n, condition_channels, *image_shape[1:])}, got "
                             f"{None if conditions is None else np.shape(conditions)}")
        conditions = torch.from_numpy(np.asarray(conditions, np.float32)) * 2.0 - 1.0
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    steps = int(steps or settings.sample_steps)
    eta = settings.ddim_eta if eta is None else float(eta)
    batch_size = int(batch_size or settings.sample_batch)
    generator = torch.Generator().manual_seed(seed)
    out = []
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        x = torch.randn((b, *image_shape), generator=generator)
        labels = None if class_label is None else torch.full((b,), int(class_label), dtype=torch.long, device=device)
        denoiser = model
        if condition_channels:
            given = conditions[done:done + b].to(device)
            denoiser = lambda x_t, t, y, given=given: model(torch.cat([x_t, given], dim=1), t, y)  # noqa: E731
        if settings.objective == "flow":
            x = _flow_sample(denoiser, x, settings, steps, labels, device)
        else:
            x = _ddim_sample(denoiser, x, settings, steps, eta, labels, device, generator)
        out.append(((x.clamp(-1.0, 1.0) + 1.0) / 2.0).numpy().astype(np.float32))
        done += b
        if progress is not None:
            progress(done, n)
    if not out:
        return np.zeros((0, *image_shape), np.float32)
    return np.concatenate(out)
