"""Figures of the evaluation: a reconstruction grid (stimulus | each pair's samples).

The grid is composed as one pixel-exact mosaic (every image resized to the same cell
with LANCZOS) and drawn with matplotlib's Agg backend only for the column headers, so
the PNG's size is known in advance and no GUI backend is needed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from brainldm.runtime.atomic import atomic_path

POINTS_PER_INCH = 72.0
HEADER_LINES = 2.2  # header band height in multiples of the font size
BACKGROUND = 255  # white page
STIMULUS_LABEL = "stimulus"


def _check(gt: np.ndarray, columns: dict[str, np.ndarray], n_items: int) -> int:
    if gt.ndim != 4 or gt.shape[-1] != 3 or gt.dtype != np.uint8 or len(gt) == 0:
        raise ValueError(f"reconstruction_grid: gt {gt.shape} {gt.dtype}; expected (N, H, W, 3) uint8 with N >= 1")
    for name, images in columns.items():
        if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) != len(gt):
            raise ValueError(f"reconstruction_grid: column '{name}' {images.shape} {images.dtype}; expected "
                             f"({len(gt)}, K, H, W, 3) uint8")
    if n_items < 1:
        raise ValueError(f"reconstruction_grid: n_items={n_items}; expected >= 1")
    return min(n_items, len(gt))


def grid_layout(n_rows: int, group_sizes: list[int], cell_px: int, gap_px: int, group_gap_px: int,
                header_px: int) -> tuple[list[list[int]], int, int]:
    """Left x (px) of every cell per group (group 0 = stimulus), total width and height (px)."""
    lefts, x = [], 0
    for g, size in enumerate(group_sizes):
        x += group_gap_px if g else 0
        lefts.append([x + j * (cell_px + gap_px) for j in range(size)])
        x = lefts[-1][-1] + cell_px
    height = header_px + n_rows * cell_px + (n_rows - 1) * gap_px
    return lefts, x, height


def _cell(image: np.ndarray, cell_px: int) -> np.ndarray:
    if image.shape[:2] == (cell_px, cell_px):
        return image
    return np.asarray(Image.fromarray(image).resize((cell_px, cell_px), Image.Resampling.LANCZOS))


def reconstruction_grid(
    gt: np.ndarray,
    columns: dict[str, np.ndarray],
    path: str | Path,
    n_items: int = 8,
    dpi: int = 150,
    cell_px: int = 128,
    gap_px: int = 4,
    group_gap_px: int = 16,
    font_pt: float = 11.0,
) -> tuple[int, int]:
    """Write a PNG grid: one row per test item; the stimulus, then each column group's samples.

    Args:
        gt: (N, H, W, 3) uint8 stimuli. columns: name -> (N, K, H', W', 3) uint8 samples
            (e.g. {"baseline": ..., "ours": ...}), drawn in the dict's order.
        path: output PNG (written atomically); n_items: first rows to show (<= N).
        dpi: figure resolution (also stored in the PNG); cell_px: side of every image cell.
    Returns:
        (width, height) of the PNG in px.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = _check(gt, columns, n_items)
    # 1. The mosaic: a header band, then one row per item.
    header_px = int(round(HEADER_LINES * font_pt * dpi / POINTS_PER_INCH))
    names = [STIMULUS_LABEL, *columns]
    groups = [gt[:n, None], *[images[:n] for images in columns.values()]]
    lefts, width, height = grid_layout(n, [g.shape[1] for g in groups], cell_px, gap_px, group_gap_px, header_px)
    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    for group, group_lefts in zip(groups, lefts):
        for i in range(n):
            top = header_px + i * (cell_px + gap_px)
            for k, left in enumerate(group_lefts):
                canvas[top:top + cell_px, left:left + cell_px] = _cell(group[i, k], cell_px)
    # 2. Headers, centred over each group, drawn by matplotlib on the exact pixel grid.
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    agg = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest", aspect="auto", extent=(0, width, height, 0))
    ax.set_axis_off()
    for name, group_lefts in zip(names, lefts):
        centre = (group_lefts[0] + group_lefts[-1] + cell_px) / 2
        fig.text(centre / width, 1 - header_px / 2 / height, name, ha="center", va="center", fontsize=font_pt)
    agg.draw()
    pixels = np.asarray(agg.buffer_rgba())[..., :3]
    # 3. Save with the dpi in the PNG metadata.
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", dpi=(dpi, dpi))
    return pixels.shape[1], pixels.shape[0]
