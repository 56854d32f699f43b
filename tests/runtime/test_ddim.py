"""The numpy DDIM against diffusers' DDIMScheduler (torch), the reference it mirrors."""
from __future__ import annotations

import numpy as np
import pytest

from brainldm.runtime import ddim

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-6
# A DDIM loop from t ~ T multiplies an early perturbation by sqrt(alpha_0 / alpha_T) ~ 15, so ulp-level
# (1e-7) rounding differences grow to ~1e-5 over a full-strength loop; see test_loop_bitwise_*.
LOOP_TOL = 2e-5
LATENT_SHAPE = (2, 4, 8, 8)
# Stable Diffusion v1.x's scheduler_config.json (a PNDM config, as shipped on the Hub).
SD_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
CONFIGS = {
    "sd_leading": SD_CONFIG,
    "sd_trailing": {**SD_CONFIG, "timestep_spacing": "trailing"},
    "sd_linspace": {**SD_CONFIG, "timestep_spacing": "linspace"},
    "linear_v_clip": {"beta_schedule": "linear", "prediction_type": "v_prediction", "clip_sample": True,
                      "set_alpha_to_one": True, "timestep_spacing": "leading"},
    "sd_sample": {**SD_CONFIG, "prediction_type": "sample"},  # the model predicts x_0 directly
    "defaults": {},
}


def _pair(config: dict) -> tuple[ddim.DDIMScheduler, "diffusers.DDIMScheduler"]:
    ours = ddim.DDIMScheduler.from_config(config)
    theirs = diffusers.DDIMScheduler.from_config({k: v for k, v in config.items() if k != "skip_prk_steps"})
    return ours, theirs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_schedule_matches_diffusers(name):
    ours, theirs = _pair(CONFIGS[name])
    np.testing.assert_allclose(ours.betas, theirs.betas.numpy(), rtol=0, atol=1e-8)
    assert ours.alphas_cumprod.dtype == np.float32
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=0, atol=2e-7)
    assert np.float32(ours.final_alpha_cumprod) == pytest.approx(float(theirs.final_alpha_cumprod), abs=1e-7)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 10, 50, 7, 1000])
def test_timesteps_identical(name, steps):
    ours, theirs = _pair(CONFIGS[name])
    theirs.set_timesteps(steps)
    got = ours.set_timesteps(steps)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, theirs.timesteps.numpy())


def _diffusers_img2img_timesteps(scheduler, steps: int, strength: float) -> np.ndarray:
    """StableDiffusionImg2ImgPipeline.get_timesteps, called unbound on a stand-in pipeline."""
    from diffusers import StableDiffusionImg2ImgPipeline

    class _Stub:
        pass

    stub = _Stub()
    stub.scheduler = scheduler
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(stub, steps, strength, "cpu")
    return timesteps.numpy()


def _mirror_torch_rounding(ours: ddim.DDIMScheduler, theirs) -> None:
    """Give `ours` diffusers' alphas_cumprod and torch's float32 sqrt of them.

    The two legitimate rounding differences: torch.linspace's float32 betas (1 ulp) and torch's
    MKL float32 sqrt (not correctly rounded). With those tables the arithmetic must be bitwise equal.
    """
    alphas_cumprod = theirs.alphas_cumprod
    final = theirs.final_alpha_cumprod
    ours.set_alphas_cumprod(alphas_cumprod.numpy().copy())
    ours.sqrt_alphas_cumprod = (alphas_cumprod ** 0.5).numpy()
    ours.sqrt_one_minus_alphas_cumprod = ((1 - alphas_cumprod) ** 0.5).numpy()
    ours.sqrt_final_alpha_cumprod = np.float32((final ** 0.5).item())
    ours.sqrt_one_minus_final_alpha_cumprod = np.float32(((1 - final) ** 0.5).item())


def _img2img_loop(ours, theirs, steps, strength, noise_scale):
    """Run both schedulers through an img2img loop; yield (ours, theirs, ours_from_theirs) per stage.

    Model outputs are the true noise plus noise_scale * N(0, 1) (noise_scale large = pure random
    outputs); ours_from_theirs is our step applied to diffusers' current sample (one-step error).
    """
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    timesteps = ours.img2img_timesteps(strength)
    np.testing.assert_array_equal(timesteps, _diffusers_img2img_timesteps(theirs, steps, strength))
    rng = np.random.default_rng(steps + int(100 * strength))
    init, noise = (rng.standard_normal(LATENT_SHAPE).astype(np.float32) for _ in range(2))
    latent_timestep = timesteps[:1].repeat(LATENT_SHAPE[0])
    x_ours = ours.add_noise(init, noise, latent_timestep)
    x_theirs = theirs.add_noise(torch.from_numpy(init), torch.from_numpy(noise), torch.from_numpy(latent_timestep))
    yield x_ours, x_theirs.numpy(), x_ours
    for t in timesteps:
        eps = (noise + noise_scale * rng.standard_normal(LATENT_SHAPE)).astype(np.float32)
        one_step = ours.step(eps, t, x_theirs.numpy())
        x_ours = ours.step(eps, t, x_ours)
        x_theirs = theirs.step(torch.from_numpy(eps), int(t), x_theirs).prev_sample
        yield x_ours, x_theirs.numpy(), one_step


@pytest.mark.parametrize("name", ["sd_leading", "sd_trailing", "sd_linspace", "linear_v_clip", "sd_sample"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
def test_loop_bitwise_with_torch_rounding(name, steps, strength):
    """Same tables in -> identical float32 out: the arithmetic and its order mirror diffusers."""
    ours, theirs = _pair(CONFIGS[name])
    _mirror_torch_rounding(ours, theirs)
    n_stages = 0
    for x_ours, x_theirs, _ in _img2img_loop(ours, theirs, steps, strength, noise_scale=3.0):
        assert x_ours.dtype == np.float32
        np.testing.assert_array_equal(x_ours, x_theirs)
        n_stages += 1
    assert n_stages == 1 + int(steps * strength)


@pytest.mark.parametrize("name", ["sd_leading", "sd_trailing", "sd_linspace"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
def test_loop_native_rounding_close_to_diffusers(name, steps, strength):
    """Correctly rounded numpy vs torch CPU: each step within TOL; a whole loop within LOOP_TOL."""
    ours, theirs = _pair(CONFIGS[name])
    for x_ours, x_theirs, one_step in _img2img_loop(ours, theirs, steps, strength, noise_scale=0.1):
        assert x_ours.dtype == np.float32
        np.testing.assert_allclose(one_step, x_theirs, rtol=0, atol=TOL)
        np.testing.assert_allclose(x_ours, x_theirs, rtol=0, atol=LOOP_TOL)


# steps x strength pairs whose product is not a whole number (or is one only up to float error,
# e.g. 0.29 * 100 = 28.999999999999996): the start step is diffusers' int(), neither round() nor ceil().
FRACTIONAL_STRENGTHS = [(50, 0.75), (7, 0.33), (9, 0.9), (10, 0.29), (100, 0.29), (3, 0.5), (20, 0.99), (10, 0.15)]


@pytest.mark.parametrize("name", ["sd_leading", "sd_trailing", "sd_linspace"])
@pytest.mark.parametrize("steps, strength", FRACTIONAL_STRENGTHS)
def test_img2img_start_step_rounds_like_diffusers(name, steps, strength):
    ours, theirs = _pair(CONFIGS[name])
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    expected = _diffusers_img2img_timesteps(theirs, steps, strength)
    got = ours.img2img_timesteps(strength)
    assert len(got) == len(expected), f"{steps} steps x strength {strength}: {len(got)} vs {len(expected)} steps"
    np.testing.assert_array_equal(got, expected)


def test_single_step_hand_computed():
    """x_{t-1} = sqrt(a_prev) (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev) eps."""
    sched = ddim.DDIMScheduler(ddim.DDIMConfig(clip_sample=False))
    sched.set_timesteps(10)
    t = 500
    a_t, a_prev = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t - 100])
    x_t, eps = np.full((1, 1, 1, 1), 0.5, np.float32), np.full((1, 1, 1, 1), -0.25, np.float32)
    expected = np.sqrt(a_prev) * (0.5 + np.sqrt(1 - a_t) * 0.25) / np.sqrt(a_t) - np.sqrt(1 - a_prev) * 0.25
    assert sched.step(eps, t, x_t).item() == pytest.approx(expected, abs=1e-6)


def test_guidance_matches_pipeline_formula():
    rng = np.random.default_rng(0)
    uncond, text = (rng.standard_normal(LATENT_SHAPE).astype(np.float32) for _ in range(2))
    got = ddim.classifier_free_guidance(uncond, text, 7.5)
    expected = torch.from_numpy(uncond) + 7.5 * (torch.from_numpy(text) - torch.from_numpy(uncond))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected.numpy())
    # scale 1 gives the text prediction up to float32 rounding of u + (t - u)
    np.testing.assert_allclose(ddim.classifier_free_guidance(uncond, text, 1.0), text, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="shape"):
        ddim.classifier_free_guidance(uncond, text[:1], 2.0)


@pytest.mark.parametrize("bad, match", [
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"thresholding": True}, "thresholding"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"use_karras_sigmas": True}, "unknown key 'use_karras_sigmas'"),
    ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start"),
])
def test_unsupported_config_is_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        ddim.DDIMScheduler.from_config({**SD_CONFIG, **bad})


def test_misuse_is_rejected():
    sched = ddim.DDIMScheduler.from_config(SD_CONFIG)
    x = np.zeros(LATENT_SHAPE, np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 1, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(1001)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="float32"):
        sched.step(x.astype(np.float64), 1, x)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(x, 1000, x)
    with pytest.raises(ValueError, match="strength"):
        sched.img2img_timesteps(1.5)
    with pytest.raises(ValueError, match="no denoising step"):
        sched.img2img_timesteps(0.05)
    with pytest.raises(ValueError, match="shape"):
        sched.add_noise(x, x[:1], 10)
