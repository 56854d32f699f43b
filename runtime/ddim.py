"""Deterministic DDIM sampling (eta = 0) in numpy, mirroring diffusers' ``DDIMScheduler``.

The runtime has no torch, so this module re-implements the parts of diffusers 0.42's
``DDIMScheduler`` (``schedulers/scheduling_ddim.py``) that image-to-image latent
diffusion needs: the beta schedule, ``set_timesteps``, ``add_noise``, ``step`` with
eta = 0, the img2img start index of ``StableDiffusionImg2ImgPipeline.get_timesteps``
and the classifier-free guidance combination. Arithmetic is float32 in the same order
as diffusers (torch's CPU ``cumprod`` accumulates in float64, so ours does too): given
diffusers' own alphas_cumprod and torch's sqrt of them, a whole loop is bitwise equal
(tests/runtime/test_ddim.py). Natively the only differences are rounding: torch's float32
linspace betas and its MKL float32 sqrt are up to 1 ulp off the correctly rounded values
used here, giving <= 1e-6 per step and ~1e-5 over a full-strength loop (which amplifies
early perturbations by sqrt(alpha_0 / alpha_T) ~ 15).

Notation (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12):
    alphas_cumprod[t]       = alpha_t in DDIM = \\bar{alpha}_t in DDPM (cumulative product)
    sqrt_alpha, sqrt_beta   = sqrt(alpha_t), sqrt(1 - alpha_t)
    sqrt_alpha_prev         = sqrt(alpha_{t-1}), t-1 the previous timestep on the inference grid
    sqrt_beta_prev          = sqrt(1 - alpha_{t-1} - sigma_t^2), sigma_t = 0 as eta = 0
    pred_epsilon            = eps_theta^(t)(x_t)
    pred_original_sample    = "predicted x_0" = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
    pred_sample_direction   = "direction pointing to x_t" = sqrt(1 - alpha_{t-1}) eps
    prev_sample (returned)  = x_{t-1} = sqrt(alpha_{t-1}) x_0 + direction
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Keys a diffusers scheduler_config may carry that do not change DDIM sampling:
# "_"-prefixed bookkeeping (_class_name, _diffusers_version, _use_default_values) is
# skipped separately; skip_prk_steps is PNDM's (Stable Diffusion's stock scheduler);
# the thresholding parameters are only read when thresholding is on (rejected below).
IGNORED_KEYS = frozenset({"skip_prk_steps", "dynamic_thresholding_ratio", "sample_max_value"})
# Features of diffusers' DDIMScheduler this port does not implement: key -> the only accepted value.
UNSUPPORTED_UNLESS = {"thresholding": False, "rescale_betas_zero_snr": False, "trained_betas": None}


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """The DDIM scheduler_config subset we support; defaults equal diffusers' DDIMScheduler defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"

    def __post_init__(self) -> None:
        choices = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": TIMESTEP_SPACINGS,
                   "prediction_type": PREDICTION_TYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DDIM scheduler_config: {name}={getattr(self, name)!r} is not supported; "
                                 f"expected one of {allowed}")
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2):
            raise ValueError(f"DDIM scheduler_config: num_train_timesteps={self.num_train_timesteps!r}; "
                             "expected an int >= 2")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"DDIM scheduler_config: beta_start={self.beta_start!r}, beta_end={self.beta_end!r}; "
                             "expected 0 < beta_start < beta_end < 1")
        if not (isinstance(self.steps_offset, int) and self.steps_offset >= 0):
            raise ValueError(f"DDIM scheduler_config: steps_offset={self.steps_offset!r}; expected an int >= 0")


def config_from_dict(config: Mapping[str, Any]) -> DDIMConfig:
    """Build a DDIMConfig from a diffusers scheduler_config dict (e.g. scheduler_config.json).

    Raises ValueError for an unknown key or a feature this port does not implement.
    """
    known = {f.name for f in dataclasses.fields(DDIMConfig)}
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in IGNORED_KEYS:
            continue
        if key in UNSUPPORTED_UNLESS:
            if value != UNSUPPORTED_UNLESS[key]:
                raise ValueError(f"DDIM scheduler_config: {key}={value!r} is not supported by the numpy "
                                 f"DDIM; expected {UNSUPPORTED_UNLESS[key]!r}")
            continue
        if key not in known:
            raise ValueError(f"DDIM scheduler_config: unknown key {key!r}; expected one of "
                             f"{sorted(known | set(UNSUPPORTED_UNLESS) | IGNORED_KEYS)}")
        kwargs[key] = value
    return DDIMConfig(**kwargs)


def _betas(config: DDIMConfig) -> np.ndarray:
    """betas (T,) float32: diffusers builds them with float32 torch.linspace; float64 then cast is within 1 ulp."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64).astype(np.float32)
    # scaled_linear (latent diffusion): linear in sqrt(beta), squared in float32 like diffusers
    root = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=np.float64).astype(np.float32)
    return root ** 2


def classifier_free_guidance(noise_uncond: np.ndarray, noise_text: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: eps = eps_uncond + s * (eps_text - eps_uncond) (Ho & Salimans 2022).

    noise_uncond, noise_text: (B, C, h, w) float32 UNet outputs; scale: guidance scale s
    (1.0 gives noise_text up to rounding). Returns (B, C, h, w) float32.
    """
    uncond = _as_float32(noise_uncond, "noise_uncond")
    text = _as_float32(noise_text, "noise_text")
    if uncond.shape != text.shape:
        raise ValueError(f"classifier_free_guidance: noise_uncond shape {uncond.shape} != noise_text shape "
                         f"{text.shape}; expected equal shapes")
    return uncond + np.float32(scale) * (text - uncond)


def _as_float32(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.float32:
        raise ValueError(f"DDIM: {name} has dtype {array.dtype}; expected float32 (cast explicitly, so "
                         "that precision changes are deliberate)")
    return array


class DDIMScheduler:
    """numpy DDIM with eta = 0; attribute and method names follow diffusers' DDIMScheduler.

    Attributes:
        config: the DDIMConfig.
        betas, alphas, alphas_cumprod: (T,) float32, T = num_train_timesteps.
        final_alpha_cumprod: float32 alpha used after the last step (1 or alphas_cumprod[0]).
        timesteps: (S,) int64 inference timesteps, descending (after set_timesteps).
        num_inference_steps: S, or None before set_timesteps.
    """

    order = 1

    def __init__(self, config: DDIMConfig | None = None) -> None:
        self.config = config if config is not None else DDIMConfig()
        self.betas = _betas(self.config)
        self.alphas = np.float32(1.0) - self.betas
        # torch's CPU cumprod accumulates float32 in float64 and rounds each output once.
        self.set_alphas_cumprod(np.cumprod(self.alphas.astype(np.float64)).astype(np.float32))
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.config.num_train_timesteps, dtype=np.int64)[::-1].copy()

    def set_alphas_cumprod(self, alphas_cumprod: np.ndarray) -> None:
        """Install alphas_cumprod (T,) float32 (e.g. diffusers' own, saved at export) and its sqrt tables.

        The tables hold sqrt(alpha_t) and sqrt(1 - alpha_t) with the subtraction in float32, exactly
        the values diffusers computes per step (numpy's sqrt is correctly rounded; torch's MKL
        float32 sqrt can be 1 ulp off, the one arithmetic difference between the two).
        """
        alphas_cumprod = np.asarray(alphas_cumprod)
        if alphas_cumprod.shape != (self.config.num_train_timesteps,) or alphas_cumprod.dtype != np.float32:
            raise ValueError(f"DDIM: alphas_cumprod has shape {alphas_cumprod.shape} dtype {alphas_cumprod.dtype}; "
                             f"expected ({self.config.num_train_timesteps},) float32")
        self.alphas_cumprod = alphas_cumprod
        self.final_alpha_cumprod = np.float32(1.0) if self.config.set_alpha_to_one else alphas_cumprod[0]
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(np.float32(1.0) - alphas_cumprod)
        self.sqrt_final_alpha_cumprod = np.sqrt(self.final_alpha_cumprod)
        self.sqrt_one_minus_final_alpha_cumprod = np.sqrt(np.float32(1.0) - self.final_alpha_cumprod)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DDIMScheduler":
        """Construct from a diffusers scheduler_config dict (see config_from_dict)."""
        return cls(config_from_dict(config))

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Set and return the (S,) int64 descending inference timesteps, S = num_inference_steps."""
        n_train = self.config.num_train_timesteps
        if not (isinstance(num_inference_steps, (int, np.integer)) and 1 <= num_inference_steps <= n_train):
            raise ValueError(f"DDIM.set_timesteps: num_inference_steps={num_inference_steps!r}; expected an int "
                             f"in [1, num_train_timesteps={n_train}]")
        steps = int(num_inference_steps)
        self.num_inference_steps = steps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, steps).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            step_ratio = n_train // steps
            timesteps = (np.arange(0, steps) * step_ratio).round()[::-1].copy().astype(np.int64)
            timesteps += self.config.steps_offset
        else:  # trailing
            step_ratio = n_train / steps
            timesteps = np.round(np.arange(n_train, 0, -step_ratio)).astype(np.int64) - 1
        self.timesteps = timesteps
        return timesteps

    def img2img_timesteps(self, strength: float) -> np.ndarray:
        """Timesteps an img2img run with this strength visits, as diffusers' Img2Img get_timesteps.

        strength in (0, 1]: 1 starts from pure noise at timesteps[0]; smaller values skip the
        first steps. Returns the (S',) int64 tail of self.timesteps; its first entry is the
        timestep at which add_noise must noise the init latents. Needs set_timesteps first.
        """
        steps = self._require_timesteps("img2img_timesteps")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"DDIM.img2img_timesteps: strength={strength!r}; expected a value in [0, 1]")
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = self.timesteps[t_start * self.order:]
        if timesteps.size == 0:
            raise ValueError(f"DDIM.img2img_timesteps: strength={strength} with {steps} steps leaves no "
                             f"denoising step; expected strength >= 1/{steps}")
        return timesteps

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: int | np.ndarray) -> np.ndarray:
        """Forward diffusion q(x_t | x_0): sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) noise.

        original_samples, noise: (B, C, h, w) float32 (latents); timesteps: an int or (B,) ints
        in [0, T). Returns (B, C, h, w) float32.
        """
        x0 = _as_float32(original_samples, "original_samples")
        eps = _as_float32(noise, "noise")
        if x0.shape != eps.shape:
            raise ValueError(f"DDIM.add_noise: original_samples shape {x0.shape} != noise shape {eps.shape}")
        t = np.atleast_1d(np.asarray(timesteps)).reshape(-1)
        for value in t:
            self._check_timestep(value, "add_noise")
        broadcast = (-1,) + (1,) * (x0.ndim - 1)
        sqrt_alpha_prod = self.sqrt_alphas_cumprod[t].reshape(broadcast)
        sqrt_one_minus_alpha_prod = self.sqrt_one_minus_alphas_cumprod[t].reshape(broadcast)
        return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * eps

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """One deterministic DDIM update x_t -> x_{t-1} (eq. 12 with sigma_t = 0).

        model_output: (B, C, h, w) float32 UNet output (eps, v or x_0 per prediction_type);
        timestep: the current int timestep t; sample: (B, C, h, w) float32 x_t.
        Returns prev_sample (B, C, h, w) float32.
        """
        steps = self._require_timesteps("step")
        output = _as_float32(model_output, "model_output")
        x_t = _as_float32(sample, "sample")
        if output.shape != x_t.shape:
            raise ValueError(f"DDIM.step: model_output shape {output.shape} != sample shape {x_t.shape}")
        t = self._check_timestep(timestep, "step")
        # diffusers' rule (also for trailing/linspace spacing): t-1 is t - T // S on the grid
        prev_t = t - self.config.num_train_timesteps // steps
        # sqrt(alpha_{t-1}) and sqrt(1 - alpha_{t-1} - sigma_t^2) with sigma_t = 0 (eta = 0)
        if prev_t >= 0:
            sqrt_alpha_prev = self.sqrt_alphas_cumprod[prev_t]
            sqrt_beta_prev = self.sqrt_one_minus_alphas_cumprod[prev_t]
        else:
            sqrt_alpha_prev = self.sqrt_final_alpha_cumprod
            sqrt_beta_prev = self.sqrt_one_minus_final_alpha_cumprod
        pred_original_sample, pred_epsilon = self._predict(output, t, x_t)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = np.clip(pred_original_sample, -limit, limit).astype(np.float32)
        pred_sample_direction = sqrt_beta_prev * pred_epsilon
        return sqrt_alpha_prev * pred_original_sample + pred_sample_direction

    def _predict(self, output: np.ndarray, t: int, x_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pred_original_sample, pred_epsilon), both float32, from the model output at timestep t."""
        sqrt_alpha, sqrt_beta = self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]
        if self.config.prediction_type == "epsilon":
            return (x_t - sqrt_beta * output) / sqrt_alpha, output
        if self.config.prediction_type == "v_prediction":
            return sqrt_alpha * x_t - sqrt_beta * output, sqrt_alpha * output + sqrt_beta * x_t
        return output, (x_t - sqrt_alpha * output) / sqrt_beta

    def _require_timesteps(self, caller: str) -> int:
        if self.num_inference_steps is None:
            raise ValueError(f"DDIM.{caller}: call set_timesteps(num_inference_steps) first")
        return self.num_inference_steps

    def _check_timestep(self, timestep: Any, caller: str) -> int:
        n_train = self.config.num_train_timesteps
        if not isinstance(timestep, (int, np.integer)) or not 0 <= timestep < n_train:
            raise ValueError(f"DDIM.{caller}: timestep={timestep!r}; expected an int in [0, {n_train})")
        return int(timestep)
