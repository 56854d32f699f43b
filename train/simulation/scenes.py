"""Procedural scenes and their captions: the stimuli of the simulated subject.

A scene is 1-3 flat shapes (several kinds, colours, sizes, positions) on a
background colour. Scenes are drawn from a seeded ``numpy.random.Generator`` and
rendered with 4x supersampling (anti-aliased edges) so that the same seed always
gives the same pixels. Captions are generated from the scene description with
several templates, so each image has several differently worded captions, as in
COCO.

The small latent diffusion model is trained on scenes from this module (with its
own seed, never the subject's test stimuli); the simulated subject's encoding
model reads the same attributes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPE_KINDS = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "dark": (45, 45, 60),
    "light": (215, 210, 200),
    "teal": (40, 110, 120),
}
SIZE_WORDS = ((0.16, "small"), (0.24, "medium"), (1.0, "large"))
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SUPERSAMPLE = 4  # sub-pixels per pixel side; enough for smooth edges at 64 px


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``x``, ``y`` centre in [0, 1] (y down); ``radius`` in units of image width."""

    kind: str
    colour: str
    x: float
    y: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """A background and 1-3 objects, drawn back to front."""

    background: str
    objects: tuple[SceneObject, ...]


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    """Draw one scene: background, object count in [1, max_objects], objects."""
    background = str(rng.choice(list(BACKGROUNDS)))
    n_objects = int(rng.integers(1, max_objects + 1))
    objects = []
    for _ in range(n_objects):
        colour = str(rng.choice([c for c in COLOURS if _contrasts(c, background)]))
        objects.append(
            SceneObject(
                kind=str(rng.choice(SHAPE_KINDS)),
                colour=colour,
                x=float(rng.uniform(0.22, 0.78)),
                y=float(rng.uniform(0.22, 0.78)),
                radius=float(rng.uniform(0.11, 0.30)),
                angle=float(rng.uniform(0, np.pi / 2)),
            )
        )
    # Largest first so that the largest object is the "main" one and smaller ones stay visible.
    objects.sort(key=lambda o: -o.radius)
    return Scene(background=background, objects=tuple(objects))


def _contrasts(colour: str, background: str) -> bool:
    difference = np.abs(np.subtract(COLOURS[colour], BACKGROUNDS[background])).sum()
    return bool(difference > 150)


def render(scene: Scene, size: int) -> np.ndarray:
    """Render a scene. Returns (size, size, 3) uint8 RGB."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    canvas = np.empty((n, n, 3), dtype=np.float64)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        canvas[shape_mask(obj, xx, yy)] = COLOURS[obj.colour]
    pooled = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(pooled), 0, 255).astype(np.uint8)


def shape_mask(obj: SceneObject, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Boolean mask of ``obj`` on the coordinate grids ``xx``, ``yy`` (values in [0, 1])."""
    cos, sin = np.cos(obj.angle), np.sin(obj.angle)
    # Rotated coordinates relative to the centre, in units of the radius.
    u = ((xx - obj.x) * cos + (yy - obj.y) * sin) / obj.radius
    v = (-(xx - obj.x) * sin + (yy - obj.y) * cos) / obj.radius
    r = np.hypot(u, v)
    if obj.kind == "circle":
        return r <= 1.0
    if obj.kind == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if obj.kind == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if obj.kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if obj.kind == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if obj.kind == "triangle":
        # Equilateral triangle inscribed in the unit circle, apex up (before rotation).
        return (v <= 0.5) & (np.sqrt(3) * u - v <= 1.0) & (-np.sqrt(3) * u - v <= 1.0)
    raise ValueError(f"unknown shape kind {obj.kind!r}; expected one of {SHAPE_KINDS}")


def size_word(obj: SceneObject) -> str:
    """'small', 'medium' or 'large' from the object's radius."""
    return next(word for limit, word in SIZE_WORDS if obj.radius <= limit)


def position_words(obj: SceneObject) -> str:
    """'top left', 'bottom', 'centre', ... from the object's centre."""
    vertical = "top" if obj.y < 0.4 else "bottom" if obj.y > 0.6 else ""
    horizontal = "left" if obj.x < 0.4 else "right" if obj.x > 0.6 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def _describe(obj: SceneObject, with_size: bool, with_position: bool) -> str:
    words = [size_word(obj)] if with_size else []
    words += [obj.colour, obj.kind]
    text = _article(words[0]) + " " + " ".join(words)
    if with_position:
        text += f" at the {position_words(obj)}"
    return text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene, rng: np.random.Generator, n_captions: int = 5) -> list[str]:
    """``n_captions`` differently worded captions of ``scene`` (lower case, no final period)."""
    count = len(scene.objects)
    main = scene.objects[0]
    noun = "shape" if count == 1 else "shapes"
    templates = [
        lambda: f"{_join([_describe(o, False, False) for o in scene.objects])} on a {scene.background} background",
        lambda: f"{COUNT_WORDS[count]} {noun} on {scene.background}: {_join([_describe(o, True, False) for o in scene.objects])}",
        lambda: f"a picture of {_join([_describe(o, False, True) for o in scene.objects])}",
        lambda: f"{_describe(main, True, True)} with a {scene.background} background",
        lambda: f"an image showing {COUNT_WORDS[count]} {noun}, the biggest is {_article(main.colour)} {main.colour} {main.kind}",
        lambda: f"{_join([_describe(o, True, True) for o in scene.objects])}",
        lambda: f"simple {noun} drawn on a {scene.background} background, mostly {main.colour}",
    ]
    order = rng.permutation(len(templates))
    return [templates[i]() for i in order[:n_captions]]


def attributes(scene: Scene) -> dict[str, int]:
    """Integer labels of a scene: main object kind and colour, object count, background."""
    main = scene.objects[0]
    return {
        "kind": SHAPE_KINDS.index(main.kind),
        "colour": list(COLOURS).index(main.colour),
        "count": len(scene.objects),
        "background": list(BACKGROUNDS).index(scene.background),
    }


def generate(
    n: int, seed: int, size: int = 64, n_captions: int = 5, max_objects: int = 3
) -> tuple[np.ndarray, list[list[str]], dict[str, np.ndarray], list[Scene]]:
    """Generate ``n`` scenes deterministically from ``seed``.

    Returns:
        images (n, size, size, 3) uint8; captions: n lists of ``n_captions`` strings;
        attributes: name -> (n,) int64 labels (see :func:`attributes`); the scenes.
    """
    if n < 0 or size < 8 or n_captions < 1 or not 1 <= max_objects <= 3:
        raise ValueError(
            f"generate: need n >= 0, size >= 8, n_captions >= 1, 1 <= max_objects <= 3; "
            f"got n={n}, size={size}, n_captions={n_captions}, max_objects={max_objects}"
        )
    scene_rng = np.random.default_rng([seed, 0])
    caption_rng = np.random.default_rng([seed, 1])
    scenes = [sample_scene(scene_rng, max_objects) for _ in range(n)]
    images = np.stack([render(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    texts = [captions(s, caption_rng, n_captions) for s in scenes]
    labels = {k: np.array([attributes(s)[k] for s in scenes], dtype=np.int64) for k in ("kind", "colour", "count", "background")}
    return images, texts, labels, scenes
