"""train_ldm's held-out evaluation helpers (the whole evaluation runs in test_train_ldm's main test)."""
from __future__ import annotations

import numpy as np
import pytest

from brainldm.train.ldm import held_out as E
from brainldm.train.simulation import scenes


def test_metric_helpers():
    images, _, labels, scene_list = scenes.generate(4, 5, 32, 1)
    assert E.mean_pixcorr(images, images) == pytest.approx(1.0)
    assert E.mean_pixcorr(images, 255 - images) == pytest.approx(-1.0, abs=1e-6)
    assert E.mean_ssim(images, images) == pytest.approx(1.0)
    assert E.main_colour_accuracy(images, scene_list, labels["colour"]) == 1.0


def test_colour_accuracy_sees_a_recoloured_main_object():
    images, _, labels, scene_list = scenes.generate(4, 5, 32, 1)
    wrong = (labels["colour"] + 1) % len(scenes.COLOURS)
    assert E.main_colour_accuracy(images, scene_list, wrong) == 0.0


def test_swap_order_picks_a_donor_of_another_colour():
    colours = np.array([0, 0, 1, 2, 2, 0])
    order = E.swap_order(colours)
    assert (colours[order] != colours).all()
    assert list(order[:3]) == [2, 2, 3]


def test_folder_megabytes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 1_500_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x" * 500_000)
    assert E.folder_megabytes(tmp_path) == pytest.approx(2.0)
    (tmp_path / "metrics.json").write_bytes(b"x" * 1_000_000)
    assert E.folder_megabytes(tmp_path) == pytest.approx(2.0)
