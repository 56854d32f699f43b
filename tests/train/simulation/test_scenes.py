import numpy as np
import pytest

from brainldm.train.simulation import scenes


def test_generate_is_deterministic_and_seed_sensitive():
    a = scenes.generate(6, seed=1, size=32)
    b = scenes.generate(6, seed=1, size=32)
    c = scenes.generate(6, seed=2, size=32)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (6, 32, 32, 3) and a[0].dtype == np.uint8
    assert all(len(caps) == 5 and len(set(caps)) == 5 for caps in a[1])


def test_render_puts_the_object_colour_at_its_centre():
    obj = scenes.SceneObject("square", "red", 0.5, 0.5, 0.3, 0.0)
    image = scenes.render(scenes.Scene("grey", (obj,)), 32)
    assert tuple(image[16, 16]) == scenes.COLOURS["red"]
    assert tuple(image[1, 1]) == scenes.BACKGROUNDS["grey"]


def test_captions_name_colour_kind_and_background():
    images, texts, labels, sc = scenes.generate(20, seed=0, size=16)
    for scene, caps, kind in zip(sc, texts, labels["kind"]):
        main = scene.objects[0]
        assert scenes.SHAPE_KINDS[kind] == main.kind
        assert any(main.colour in c and main.kind in c for c in caps)
        assert " a orange" not in " ".join(caps)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_objects"):
        scenes.generate(2, seed=0, max_objects=5)
