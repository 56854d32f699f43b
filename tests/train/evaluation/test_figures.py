import numpy as np
import pytest
from PIL import Image

from brainldm.train.evaluation import figures


def _images(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("dpi", [72, 150, 300])
def test_grid_pixel_size_and_content(tmp_path, dpi):
    gt = _images((5, 20, 20, 3), 0)
    columns = {"baseline": _images((5, 3, 16, 16, 3), 1), "ours": _images((5, 2, 40, 40, 3), 2)}
    path = tmp_path / "grid.png"
    size = figures.reconstruction_grid(gt, columns, path, n_items=4, dpi=dpi, cell_px=30, gap_px=2, group_gap_px=10)
    header = int(round(figures.HEADER_LINES * 11.0 * dpi / figures.POINTS_PER_INCH))
    lefts, width, height = figures.grid_layout(4, [1, 3, 2], 30, 2, 10, header)
    assert width == 30 + 10 + 3 * 30 + 2 * 2 + 10 + 2 * 30 + 2 and height == header + 4 * 30 + 3 * 2
    image = Image.open(path)
    assert size == image.size == (width, height)
    assert image.info["dpi"] == pytest.approx((dpi, dpi), abs=0.05)  # PNG stores whole dots per metre
    pixels = np.asarray(image.convert("RGB"))
    # the first stimulus sits pixel-exact in its cell (resized 20 -> 30 px)
    expected = np.asarray(Image.fromarray(gt[0]).resize((30, 30), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(pixels[header:header + 30, 0:30], expected)
    # headers are drawn: the header band is not blank
    assert (pixels[:header] < 200).any()


def test_grid_rejects_bad_input(tmp_path):
    gt = _images((3, 8, 8, 3), 0)
    with pytest.raises(ValueError, match="column 'ours'"):
        figures.reconstruction_grid(gt, {"ours": _images((2, 1, 8, 8, 3), 1)}, tmp_path / "g.png")
    with pytest.raises(ValueError, match="n_items"):
        figures.reconstruction_grid(gt, {"ours": _images((3, 1, 8, 8, 3), 1)}, tmp_path / "g.png", n_items=0)
    assert not (tmp_path / "g.png").exists()
