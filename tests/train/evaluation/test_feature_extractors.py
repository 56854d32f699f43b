"""MindEye feature extractors: torchvision-compatible networks, local weight loading, evaluate integration.

Weights are random and seeded (no pretrained file is downloaded); the checks are that the
networks have torchvision's parameters and key shapes, that each loader reads its file
format back into the same network, and that bad files fail with errors naming the path.
"""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from brainldm.train.evaluation import evaluate as ev
from brainldm.train.evaluation import feature_extractors as fe
from brainldm.train.evaluation.feature_nets import AlexNet, EfficientNetB1, ResNet50
from brainldm.train.evaluation.feature_nets_inception import Inception3
from tests.train.evaluation.test_evaluate import TEST_INDEX, _setup, assets  # noqa: F401  (assets is a fixture)

# torchvision's parameter counts (weights.meta["num_params"]; Inception v3 includes AuxLogits).
TORCHVISION_PARAMS = {AlexNet: 61_100_840, ResNet50: 25_557_032, Inception3: 27_161_264, EfficientNetB1: 7_794_184}
# Inception's aux head from its layer shapes: conv0 768->128 1x1 + BN, conv1 128->768 5x5 + BN, fc 768->1000.
INCEPTION_AUX_PARAMS = 768 * 128 + 2 * 128 + 128 * 768 * 5 * 5 + 2 * 768 + 768 * 1000 + 1000
TORCHVISION_SHAPES = {
    AlexNet: {"features.3.weight": (192, 64, 5, 5), "classifier.1.weight": (4096, 9216), "classifier.6.bias": (1000,)},
    ResNet50: {"layer4.2.conv3.weight": (2048, 512, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
               "layer3.5.bn2.running_var": (256,), "fc.weight": (1000, 2048)},
    EfficientNetB1: {"features.8.0.weight": (1280, 320, 1, 1), "features.1.0.block.1.fc1.weight": (8, 32, 1, 1),
                     "features.2.0.block.0.0.weight": (96, 16, 1, 1), "features.7.1.block.3.1.weight": (320,),
                     "classifier.1.weight": (1000, 1280)},
    Inception3: {"Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
                 "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7), "AuxLogits.fc.weight": (1000, 768)},
}
# Feature widths at MindEye's input sizes (AlexNet at 256 px: 31x31 after conv2, 15x15 after conv5).
FEATURE_WIDTH = {"alexnet2": 192 * 31 * 31, "alexnet5": 256 * 15 * 15, "inceptionv3": 2048, "effnet_b1": 1280,
                 "swav": 2048}
# space -> (network, direct forward from the preprocessed tensor, weights file name)
DIRECT = {
    "alexnet2": (AlexNet, lambda m, x: m.feature_map(x, 4), "alexnet.safetensors"),
    "alexnet5": (AlexNet, lambda m, x: m.feature_map(x, 11), "alexnet.safetensors"),
    "inceptionv3": (Inception3, lambda m, x: m.pooled_features(x), "inception_v3.pth"),
    "effnet_b1": (EfficientNetB1, lambda m, x: m.pooled_features(x), "efficientnet_b1.pth"),
    "swav": (ResNet50, lambda m, x: m.pooled_features(x), "swav_800ep_pretrain.pth.tar"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run these tiny forwards on one thread: with every core busy elsewhere, OpenMP's spinning
    worker threads make multi-threaded CPU convolutions tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _seeded(cls, seed: int = 0) -> torch.nn.Module:
    """A network with seeded random weights, BatchNorm statistics included (so buffers are checked too)."""
    torch.manual_seed(seed)
    model = cls()
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_(0.0, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    return model.eval()


def _swav_checkpoint(state: dict) -> dict:
    """SwAV's layout: DataParallel 'module.' keys, projection head and prototypes, no fc, no BN counters."""
    kept = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    return {"state_dict": {**kept, "module.projection_head.0.weight": torch.randn(8, 2048),
                           "module.prototypes.weight": torch.randn(3, 8)}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Seeded weights of every network saved in its loader's format: space -> (path, torchvision state dict)."""
    root = tmp_path_factory.mktemp("feature_weights")
    out = {}
    for cls in (AlexNet, Inception3, EfficientNetB1, ResNet50):
        state = _seeded(cls).state_dict()
        for name, (net, _, file) in DIRECT.items():
            if net is not cls:
                continue
            path = root / file
            if not path.exists():
                if file.endswith(".safetensors"):
                    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
                else:
                    torch.save(_swav_checkpoint(state) if name == "swav" else state, path)
            out[name] = (path, state)
    return out


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("cls", [AlexNet, ResNet50, Inception3, EfficientNetB1], ids=lambda c: c.__name__)
def test_torchvision_parameter_count_and_key_shapes(cls):
    model = cls()
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[cls]
    state = model.state_dict()
    for key, shape in TORCHVISION_SHAPES[cls].items():
        assert tuple(state[key].shape) == shape, key
    if cls is Inception3:
        assert sum(p.numel() for p in model.AuxLogits.parameters()) == INCEPTION_AUX_PARAMS


def test_mindeye_input_sizes():
    sizes = {name: spec.size for name, spec in fe.PREPROCESS.items()}
    assert sizes == {"alexnet2": 256, "alexnet5": 256, "inceptionv3": 342, "clip_vitl14": 224, "effnet_b1": 255,
                     "swav": 224}
    assert {spec.mean for name, spec in fe.PREPROCESS.items() if name != "clip_vitl14"} == {(0.485, 0.456, 0.406)}
    assert set(fe.PREPROCESS) == set(fe.MINDEYE_SPACES) == set(fe.FEATURE_EXTRACTORS)


@pytest.mark.parametrize("name", list(DIRECT))
def test_round_trip_features(name, weights, images):
    path, state = weights[name]
    features_fn = fe.FEATURE_EXTRACTORS[name](str(path))
    first, second = features_fn(images), features_fn(images)
    assert first.shape == (len(images), FEATURE_WIDTH[name]) and first.dtype == np.float32
    assert np.isfinite(first).all() and first.std() > 0
    np.testing.assert_array_equal(first, second)
    cls, forward, _ = DIRECT[name]
    model = _seeded(cls, seed=1)  # other weights, replaced by the saved ones
    model.load_state_dict(state)
    with torch.inference_mode():
        direct = forward(model, fe.preprocess(images, fe.PREPROCESS[name])).flatten(1).numpy()
    np.testing.assert_array_equal(first, direct)


def test_swav_accepts_a_plain_torchvision_resnet50_file(weights, tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(weights["swav"][1], path)
    assert callable(fe.load_swav(str(path)))


def test_preprocess_is_mindeye_resize_and_normalise():
    image = np.random.default_rng(1).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    unit = torch.from_numpy(image.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0))
    # a 256 px image is not resampled for AlexNet (Resize(256) of a 256 px square is the identity)
    identity = fe.Preprocess(256, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.testing.assert_close(fe.preprocess(image, identity), unit, rtol=0, atol=0)
    x = fe.preprocess(image, fe.PREPROCESS["inceptionv3"])
    assert x.shape == (1, 3, fe.INCEPTION_SIZE, fe.INCEPTION_SIZE) and x.dtype == torch.float32
    clip = fe.preprocess(image, fe.PREPROCESS["clip_vitl14"])
    resized = torch.nn.functional.interpolate(unit, size=(224, 224), mode="bilinear", align_corners=False)
    expected = (resized - torch.tensor(fe.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(fe.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip, expected)


def _tiny_clip(folder):
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=16)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(folder)
    return model


def test_clip_from_local_folder(tmp_path, images):
    model = _tiny_clip(tmp_path / "clip")
    features_fn = fe.FEATURE_EXTRACTORS["clip_vitl14"](str(tmp_path / "clip"))
    features = features_fn(images)
    assert features.shape == (2, 16) and features.dtype == np.float32 and np.isfinite(features).all()
    np.testing.assert_array_equal(features, features_fn(images))
    with torch.inference_mode():
        spec = fe.Preprocess(28, fe.CLIP_MEAN, fe.CLIP_STD)  # the checkpoint's image_size
        direct = model(pixel_values=fe.preprocess(images, spec)).image_embeds.numpy()
    np.testing.assert_allclose(features, direct, rtol=1e-5, atol=1e-6)


def test_clip_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere has no config.json.*openai/clip-vit-large-patch14"):
        fe.load_clip_vitl14(str(tmp_path / "nowhere"))
    folder = tmp_path / "config_only"
    folder.mkdir()
    CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                     patch_size=14, projection_dim=16).save_pretrained(folder)
    with pytest.raises(fe.FeatureWeightsError, match="config_only: cannot be loaded as a CLIP vision model"):
        fe.load_clip_vitl14(str(folder))
    # a CLIP vision tower without the projection would silently get a random projection
    CLIPVisionModel(CLIPVisionConfig.from_pretrained(folder)).save_pretrained(tmp_path / "no_projection")
    with pytest.raises(fe.FeatureWeightsError, match=r"no_projection: not CLIP vision weights: missing keys "
                       r"\['visual_projection\.weight'\]"):
        fe.load_clip_vitl14(str(tmp_path / "no_projection"))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.pth; expected torchvision's .*alexnet-owt-7be5be79\.pth"):
        fe.load_alexnet2(str(tmp_path / "absent.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(fe.FeatureWeightsError, match=r"garbage\.pth: cannot be read as torchvision inception_v3"):
        fe.load_inceptionv3(str(garbage))
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(fe.FeatureWeightsError, match=r"list\.pth: holds list, not a state dict.*efficientnet_b1"):
        fe.load_effnet_b1(str(listed))


def test_wrong_keys_and_shapes_named(weights, tmp_path):
    state = dict(weights["effnet_b1"][1])
    state["features.8.0.weights"] = state.pop("features.8.0.weight")
    renamed = tmp_path / "renamed.pth"
    torch.save(state, renamed)
    with pytest.raises(fe.FeatureWeightsError, match=r"renamed\.pth: not torchvision efficientnet_b1 weights: "
                       r"missing keys \['features\.8\.0\.weight'\] \(1\); unexpected keys \['features\.8\.0\.weights'\]"):
        fe.load_effnet_b1(str(renamed))
    state = dict(weights["effnet_b1"][1], **{"classifier.1.bias": torch.zeros(10)})
    reshaped = tmp_path / "reshaped.pth"
    torch.save(state, reshaped)
    with pytest.raises(fe.FeatureWeightsError, match=r"wrong shapes \['classifier\.1\.bias: \(10,\) != \(1000,\)'\]"):
        fe.load_effnet_b1(str(reshaped))


def test_evaluate_reports_a_configured_space(tmp_path, assets, weights):  # noqa: F811  (pytest fixture)
    cfg = _setup(tmp_path, assets)
    path = str(weights["alexnet2"][0])
    out = ev.run(dataclasses.replace(cfg, feature_weights={**cfg.feature_weights, "alexnet2": path}), "ds")
    result = json.loads((out / "metrics.json").read_text())
    assert result["feature_spaces"]["alexnet2"] == f"computed from {path}"
    assert result["feature_spaces"]["alexnet5"].startswith("not computed")
    assert result["chance"]["ident_alexnet2"] == 0.5
    same, shuffled = result["pairs"]["same"]["ident_alexnet2"], result["pairs"]["shuffled"]["ident_alexnet2"]
    assert same["mean"] == 1.0 and same["n"] == len(TEST_INDEX)
    assert 0.0 <= shuffled["mean"] < 1.0
    with open(out / "per_image.csv", newline="") as f:
        assert all(row["ident_alexnet2"] != "" for row in csv.DictReader(f))
