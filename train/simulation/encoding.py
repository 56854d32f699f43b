"""Voxel-wise encoding model of the simulated subject.

Lower areas (V1, V2, V3, hV4) are retinotopic: each voxel has a Gaussian population
receptive field (pRF) over the image and responds, through a softplus, to a linear mix
of pRF-pooled local colour (luminance and two opponent channels), compressed local
contrast energy and compressed energy at its preferred orientation. pRF size grows
from V1 to hV4 and with eccentricity. Higher areas respond (softplus again) to
semantic attributes of the scene (main shape kind, colours of all objects, object
count, background), mixed with a coarse large-pRF visual response. Trials add
Gaussian noise and per-session offsets and gains (drift); voxels outside every ROI get
the noise floor only.

Everything is drawn from a ``numpy.random.Generator`` passed in, so the same seed gives
the same responses bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from brainldm.train.simulation import scenes

AREA_CLASSES = ("V1", "V2", "V3", "hV4", "mid", "high")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luminance weights
N_COLOUR_FEATURES = 3  # luminance, red-green, blue-yellow
ECCENTRICITY_SCALING = 1.5  # pRF sigma grows by this factor per image width of eccentricity
FOVEA_MARGIN = 0.02  # smallest pRF centre offset from the vertical/horizontal meridian
MAX_OFFSET = 0.5  # pRF centres stay inside the image (offsets from its centre)
POLE_X = 0.3  # occipital poles sit at +-0.3 of the half-width from the midline
LATERAL_GAIN = 2.0  # how readily voxels away from the pole count as lateral rather than ventral/dorsal
LAYOUT_JITTER = 0.04  # noise on the distance ranking, so ROI borders are not perfect shells
DIRECTIONS = ("ventral", "lateral", "dorsal")
SEMANTIC_DENSITY = 0.35  # fraction of semantic features a higher-area voxel is tuned to
# Semantic code: one-hot main kind, multi-hot object colours, one-hot count, one-hot background.
SEMANTIC_WIDTH = len(scenes.SHAPE_KINDS) + len(scenes.COLOURS) + len(scenes.COUNT_WORDS) + len(scenes.BACKGROUNDS)


@dataclass(frozen=True)
class EncodingConfig:
    """Knobs of the encoding model and of the trial noise (percent signal change units)."""

    prf_sizes: dict[str, float] = field(
        default_factory=lambda: {"V1": 0.04, "V2": 0.06, "V3": 0.085, "hV4": 0.12, "mid": 0.18, "high": 0.3}
    )  # pRF sigma at the fovea, in units of image width, per area class
    feature_grid: int = 32  # feature maps are block-averaged to this many cells per side
    n_orientations: int = 4
    compressive_exponent: float = 0.5  # energy ** exponent (compressive spatial summation)
    colour_weight: float = 1.0
    contrast_weight: float = 0.5
    orientation_weight: float = 0.5
    nonlinearity_gain: float = 1.0  # response = softplus(gain * standardised drive)
    semantic_weight: dict[str, float] = field(default_factory=lambda: {"mid": 0.5, "high": 0.85})
    snr: float = 0.8  # signal std / trial-noise std for ROI voxels
    noise_sd: float = 1.0  # trial noise std (percent signal change), also the non-ROI noise floor
    amplitude_spread: float = 0.3  # log-normal spread of per-voxel response amplitude
    baseline_sd: float = 0.5  # per-voxel mean beta spread
    session_offset_sd: float = 0.4  # per-session, per-voxel additive drift
    session_scale_sd: float = 0.15  # per-session, per-voxel log-gain drift


@dataclass(frozen=True)
class VoxelModel:
    """Per-voxel parameters. V voxels; image coordinates in [0, 1], y down."""

    area: np.ndarray  # (V,) str, one of AREA_CLASSES or "" (non-ROI)
    prf_x: np.ndarray  # (V,) float32 pRF centre
    prf_y: np.ndarray  # (V,) float32
    prf_sigma: np.ndarray  # (V,) float32
    preferred_orientation: np.ndarray  # (V,) int64 index into the orientation channels
    colour_weights: np.ndarray  # (V, 3) float32
    contrast_weight: np.ndarray  # (V,) float32
    orientation_weight: np.ndarray  # (V,) float32
    semantic_weights: np.ndarray  # (V, F_sem) float32
    semantic_mix: np.ndarray  # (V,) float32 in [0, 1]
    amplitude: np.ndarray  # (V,) float32 percent signal change per unit signal (0 for non-ROI)
    baseline: np.ndarray  # (V,) float32 percent


def semantic_features(scene_list: list[scenes.Scene]) -> np.ndarray:
    """Binary semantic code of each scene.

    Returns (N, F_sem) float32: one-hot main kind, multi-hot colours of all objects,
    one-hot object count, one-hot background.
    """
    colours, kinds, backgrounds = list(scenes.COLOURS), scenes.SHAPE_KINDS, list(scenes.BACKGROUNDS)
    n_counts = len(scenes.COUNT_WORDS)
    out = np.zeros((len(scene_list), SEMANTIC_WIDTH), dtype=np.float32)
    for i, scene in enumerate(scene_list):
        out[i, kinds.index(scene.objects[0].kind)] = 1
        for obj in scene.objects:
            out[i, len(kinds) + colours.index(obj.colour)] = 1
        out[i, len(kinds) + len(colours) + len(scene.objects) - 1] = 1
        out[i, len(kinds) + len(colours) + n_counts + backgrounds.index(scene.background)] = 1
    return out


def image_features(images: np.ndarray, grid: int, n_orientations: int) -> np.ndarray:
    """Local feature maps of images (N, S, S, 3) uint8, S divisible by ``grid``.

    Returns (N, 4 + n_orientations, grid, grid) float32: luminance, red-green,
    blue-yellow (block means, centred on mid grey), contrast energy, then the energy
    of each orientation channel theta_k = k * pi / K.
    """
    n, size = images.shape[0], images.shape[1]
    if size % grid:
        raise ValueError(f"feature_grid={grid} must divide the image size {size}")
    block = size // grid

    def pool(feature_map: np.ndarray) -> np.ndarray:  # block mean at full resolution -> grid
        return feature_map.reshape(n, grid, block, grid, block).mean(axis=(2, 4))

    rgb = images.astype(np.float32) / np.float32(255)
    lum = rgb @ LUMA
    grad_y, grad_x = np.gradient(lum, axis=(1, 2))
    maps = [
        pool(lum - np.float32(0.5)),
        pool(rgb[..., 0] - rgb[..., 1]),
        pool(rgb[..., 2] - np.float32(0.5) * (rgb[..., 0] + rgb[..., 1])),
        pool(grad_x**2 + grad_y**2),
    ]
    for k in range(n_orientations):
        theta = np.pi * k / n_orientations
        maps.append(pool((grad_x * np.float32(np.cos(theta)) + grad_y * np.float32(np.sin(theta))) ** 2))
    return np.stack(maps, axis=1).astype(np.float32)


def prf_weights(model: VoxelModel, grid: int) -> np.ndarray:
    """Gaussian pRF weights over the feature grid. Returns (V, grid*grid) float32, rows sum to 1."""
    centres = (np.arange(grid, dtype=np.float32) + 0.5) / grid
    dx = centres[None, None, :] - model.prf_x[:, None, None]
    dy = centres[None, :, None] - model.prf_y[:, None, None]
    weights = np.exp(-(dx**2 + dy**2) / (2 * model.prf_sigma[:, None, None] ** 2)).reshape(len(model.area), -1)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def build_voxels(
    area: np.ndarray, field_x: np.ndarray, field_y: np.ndarray, config: EncodingConfig, rng: np.random.Generator
) -> VoxelModel:
    """Draw per-voxel parameters.

    Args:
        area: (V,) str area class per voxel (AREA_CLASSES) or "" for non-ROI voxels.
        field_x: (V,) int, +1 right / -1 left visual hemifield (contralateral), 0 both.
        field_y: (V,) int, +1 lower / -1 upper visual field (y down), 0 both.
    """
    v = len(area)
    unknown = sorted(set(area.tolist()) - set(AREA_CLASSES) - {""})
    if unknown or set(AREA_CLASSES) - set(config.prf_sizes):
        raise ValueError(f"area classes must be in {AREA_CLASSES} with a prf_sizes entry each; got {unknown}")
    # 1. Retinotopy: centre in the voxel's quadrant or hemifield; sigma grows with eccentricity.
    offset_x = rng.uniform(FOVEA_MARGIN, MAX_OFFSET, v)
    offset_y = rng.uniform(FOVEA_MARGIN, MAX_OFFSET, v)
    sign_x = np.where(field_x == 0, rng.choice([-1.0, 1.0], v), field_x)
    sign_y = np.where(field_y == 0, rng.choice([-1.0, 1.0], v), field_y)
    eccentricity = np.hypot(offset_x, offset_y)
    base_sigma = np.array([config.prf_sizes.get(a, config.prf_sizes["high"]) for a in area])
    # 2. Feature tuning: signed colour weights, positive energy weights, a preferred orientation.
    semantic = rng.standard_normal((v, SEMANTIC_WIDTH)) * (rng.random((v, SEMANTIC_WIDTH)) < SEMANTIC_DENSITY)
    is_roi = area != ""
    amplitude = config.snr * config.noise_sd * np.exp(config.amplitude_spread * rng.standard_normal(v))
    f32 = np.float32
    return VoxelModel(
        area=area,
        prf_x=(0.5 + sign_x * offset_x).astype(f32),
        prf_y=(0.5 + sign_y * offset_y).astype(f32),
        prf_sigma=(base_sigma * (1 + ECCENTRICITY_SCALING * eccentricity)).astype(f32),
        preferred_orientation=rng.integers(0, config.n_orientations, v),
        colour_weights=(config.colour_weight * rng.standard_normal((v, N_COLOUR_FEATURES))).astype(f32),
        contrast_weight=(config.contrast_weight * np.abs(rng.standard_normal(v))).astype(f32),
        orientation_weight=(config.orientation_weight * np.abs(rng.standard_normal(v))).astype(f32),
        semantic_weights=semantic.astype(f32),
        semantic_mix=np.array([config.semantic_weight.get(a, 0.0) for a in area], dtype=f32),
        amplitude=np.where(is_roi, amplitude, 0).astype(f32),
        baseline=(config.baseline_sd * rng.standard_normal(v)).astype(f32),
    )


def _standardise(x: np.ndarray) -> np.ndarray:
    """Z-score over the first axis (images); constant columns become 0."""
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0, x)


def nonlinear_response(drive: np.ndarray, gain: float, threshold: float = 0.0) -> np.ndarray:
    """The voxels' output nonlinearity: z(softplus(gain * (z(drive) - threshold))), z = z-score
    over images.

    ``drive (N, V)`` -> ``(N, V)``. Near-linear for gain -> 0 (softplus' curvature ~ gain/4 on
    standardised drive); rectifying for gain >~ 3, at the mean for threshold 0 (the simulator's
    case), in the drive's upper tail for threshold > 0 (sparse responses: the control study's
    latent subject, where a linear read-out keeps less of the code). The study uses this same
    function, so its knobs mean what the simulator's do.
    """
    return _standardise(_softplus(gain * (_standardise(drive) - threshold)))


def voxel_signal(
    model: VoxelModel, images: np.ndarray, semantic: np.ndarray, config: EncodingConfig
) -> np.ndarray:
    """Noise-free response of every voxel to every image.

    Args:
        images: (N, S, S, 3) uint8; semantic: (N, F_sem) float32 from :func:`semantic_features`.
    Returns:
        (N, V) float32, z-scored per voxel over the N images (0 for non-ROI voxels).
    """
    # 1. pRF-pooled local features: P[n, f, v] = sum_xy feature[n, f, xy] * g_v(xy).
    features = image_features(images, config.feature_grid, config.n_orientations)
    n, n_feat = features.shape[:2]
    pooled = (features.reshape(n * n_feat, -1) @ prf_weights(model, config.feature_grid).T).reshape(n, n_feat, -1)
    colour = _standardise(pooled[:, :N_COLOUR_FEATURES].reshape(n, -1)).reshape(n, N_COLOUR_FEATURES, -1)
    energy = _standardise(pooled[:, N_COLOUR_FEATURES:].reshape(n, -1) ** config.compressive_exponent)
    energy = energy.reshape(n, n_feat - N_COLOUR_FEATURES, -1)
    voxels = np.arange(len(model.area))
    # 2. Retinotopic drive and its nonlinearity.
    drive = (
        np.einsum("ncv,vc->nv", colour, model.colour_weights)
        + model.contrast_weight * energy[:, 0]
        + model.orientation_weight * energy[:, 1 + model.preferred_orientation, voxels]
    )
    visual = nonlinear_response(drive, config.nonlinearity_gain)
    # 3. Semantic drive (higher areas) and the per-voxel mix.
    meaning = nonlinear_response(semantic @ model.semantic_weights.T, config.nonlinearity_gain)
    mixed = (1 - model.semantic_mix) * visual + model.semantic_mix * meaning
    return np.where(model.area != "", _standardise(mixed), 0).astype(np.float32)


def simulate_trials(
    model: VoxelModel,
    signal: np.ndarray,
    image_of_trial: np.ndarray,
    session_of_trial: np.ndarray,
    config: EncodingConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Single-trial responses in percent signal change.

    beta[t, v] = gain[s, v] * (baseline[v] + amplitude[v] * signal[i, v] + noise_sd * eps) + offset[s, v]
    with s the trial's session, i its image and eps ~ N(0, 1).

    Args:
        signal: (N, V) float32 from :func:`voxel_signal`; image_of_trial: (T,) int rows of
        ``signal``; session_of_trial: (T,) int, 0-based session.
    Returns:
        (T, V) float32.
    """
    n_sessions = int(session_of_trial.max()) + 1 if len(session_of_trial) else 0
    v = signal.shape[1]
    offset = (config.session_offset_sd * rng.standard_normal((n_sessions, v))).astype(np.float32)
    gain = np.exp(config.session_scale_sd * rng.standard_normal((n_sessions, v))).astype(np.float32)
    noise = rng.standard_normal((len(image_of_trial), v), dtype=np.float32) * np.float32(config.noise_sd)
    clean = model.baseline + model.amplitude * signal[image_of_trial]
    return (gain[session_of_trial] * (clean + noise) + offset[session_of_trial]).astype(np.float32)


@dataclass(frozen=True)
class Layout:
    """Voxels of a (X, Y, Z) volume. ``roi[x, y, z]``: index into ``names`` + 1, 0 none, -1 outside brain."""

    roi: np.ndarray  # (X, Y, Z) int16
    names: tuple[str, ...]
    direction: np.ndarray  # (X, Y, Z) int64 index into DIRECTIONS
    left: np.ndarray  # (X, Y, Z) bool, left hemisphere (represents the right visual field)
    inferior: np.ndarray  # (X, Y, Z) bool, below the calcarine plane (ventral: upper visual field)


def brain_layout(grid: tuple[int, ...], plan: list[tuple[str, int, str, str]], rng: np.random.Generator) -> Layout:
    """Place ROIs as blobs in an ellipsoidal brain, nearest the occipital poles first.

    Args:
        grid: (X, Y, Z); y runs posterior -> anterior, z inferior -> superior.
        plan: (name, n_voxels, direction "any"|"ventral"|"lateral"|"dorsal", hemisphere "l"|"r"|"")
            in order; each ROI takes the unassigned voxels nearest the poles that fit.
    """
    axes = [np.arange(n, dtype=np.float64) for n in grid]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    xn, zn = (x - (grid[0] - 1) / 2) / ((grid[0] - 1) / 2), (z - (grid[2] - 1) / 2) / ((grid[2] - 1) / 2)
    yn = y / (grid[1] - 1)
    brain = xn**2 + (2 * yn - 1) ** 2 + zn**2 <= 1
    distance = np.sqrt((np.abs(xn) - POLE_X) ** 2 + yn**2 + zn**2) + LAYOUT_JITTER * rng.standard_normal(grid)
    direction = np.argmax(np.stack([-zn, LATERAL_GAIN * (np.abs(xn) - POLE_X), zn]), axis=0)
    roi = np.where(brain, 0, -1).astype(np.int16)
    order = np.argsort(np.where(brain, distance, np.inf), axis=None, kind="stable")[: int(brain.sum())]
    for index, (name, count, where, hemisphere) in enumerate(plan, start=1):
        flat = order[roi.ravel()[order] == 0]
        if where != "any":
            flat = flat[direction.ravel()[flat] == DIRECTIONS.index(where)]
        if hemisphere:
            flat = flat[(xn.ravel()[flat] < 0) == (hemisphere == "l")]
        if len(flat) < count:
            raise ValueError(f"grid {tuple(grid)} too small: ROI {name} needs {count} voxels, {len(flat)} left")
        roi.ravel()[flat[:count]] = index
    return Layout(roi=roi, names=tuple(p[0] for p in plan), direction=direction, left=xn < 0, inferior=zn < 0)


def visual_field(layout: Layout, area: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contralateral hemifield and (for V1-V3) upper/lower quadrant of voxels ``mask``.

    Returns field_x, field_y (V,) int: +1 right / lower, -1 left / upper, 0 both.
    """
    field_x = np.where(layout.left[mask], 1, -1)
    quadrant = np.isin(area, ("V1", "V2", "V3"))
    # Ventral early areas map the upper field; y runs down in images.
    field_y = np.where(quadrant, np.where(layout.inferior[mask], -1, 1), 0)
    return field_x, field_y
