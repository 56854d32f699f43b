"""Decoder modules: shapes, residual skips, VAE loss, GCN graph batching, ONNX parity, checkpoints."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from brainldm.train.decoding.decoders import (CnnDecoder, DecoderSpec, GcnDecoder, ResidualBlock1d, build_decoder,
                                     load_checkpoint, node_index, save_checkpoint, vae_loss)

ROIS = ("V1", "V2", "V3", "hV4")
SIZES = (9, 7, 4, 3)
NODES = (("V1",), ("V2",), ("V3", "hV4"))
EDGE_INDEX = torch.tensor([[0, 1, 0, 2, 1, 2], [1, 0, 2, 0, 2, 1]])
EDGE_WEIGHT = torch.tensor([0.6, 0.6, 0.3, 0.3, 0.5, 0.5])
Z_SHAPE = (4, 2, 2)
ARCHS = {
    "ridge": {},
    "cnn": {"channels": 4, "n_blocks": 2, "kernel_size": 3, "stem_stride": 2, "pool": 2, "hidden": [16, 16]},
    "vae": {"hidden": 16, "recon_hidden": 8, "beta": 0.01, "gamma": 0.5},
    "gcn": {"hidden": 8, "cheb_k": 3, "pooling": "flatten", "head_hidden": 16},
}


def spec(kind: str, **arch) -> DecoderSpec:
    return DecoderSpec(kind=kind, target="z", target_shape=Z_SHAPE, input_rois=ROIS, roi_sizes=SIZES,
                       arch=dict(ARCHS[kind], **arch), node_rois=NODES if kind == "gcn" else None)


def make(kind: str, seed: int = 0, **arch) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_decoder(spec(kind, **arch), EDGE_INDEX, EDGE_WEIGHT)
    # a few training steps so BatchNorm running statistics are not the identity
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, sum(SIZES)))
    return model.eval()


@pytest.mark.parametrize("kind", ["ridge", "cnn", "vae", "gcn"])
def test_onnx_export_matches_onnxruntime(tmp_path, kind):
    model = make(kind)
    x = torch.randn(5, sum(SIZES))
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=18, input_names=["voxels"],
                      output_names=["target"], dynamic_axes={"voxels": {0: "batch"}, "target": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # a batch size other than the traced one
        xb = torch.randn(batch, sum(SIZES))
        got = session.run(None, {"voxels": xb.numpy()})[0]
        with torch.no_grad():
            want = model(xb).numpy()
        assert got.shape == (batch, int(np.prod(Z_SHAPE)))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_residual_blocks_have_own_weights_and_a_real_skip():
    model = CnnDecoder(40, 6, channels=3, n_blocks=2, kernel_size=3, stem_stride=1, pool=2, hidden=(8, 8))
    a, b = model.blocks
    assert a.body[0].weight.data_ptr() != b.body[0].weight.data_ptr()
    block = ResidualBlock1d(3, 3).eval()
    with torch.no_grad():
        block.body[4].weight.zero_()  # last BN scale 0: the body adds only its BN bias (0)
    x = torch.randn(2, 3, 10)
    assert torch.equal(block(x), torch.relu(x))


def test_cnn_rejects_too_few_voxels():
    with pytest.raises(ValueError, match="too few"):
        CnnDecoder(5, 4, stem_stride=4, pool=4)


def test_vae_samples_in_training_and_predicts_the_mean_in_eval():
    model = make("vae")
    x = torch.randn(6, sum(SIZES))
    mu, logvar = model.encode(x)
    assert torch.equal(model(x), mu) and mu.shape == (6, 16)
    latent, _, _, recon = model.training_terms(x)
    assert torch.equal(latent, mu) and recon.shape == x.shape
    model = make("vae", dropout=0.0).train()  # no dropout: eps is the only random draw
    torch.manual_seed(1)
    latent, mu_t, logvar_t, _ = model.training_terms(x)
    torch.manual_seed(1)
    eps = torch.randn_like(mu_t)
    torch.testing.assert_close(latent, mu_t + eps * torch.exp(0.5 * logvar_t))


def test_vae_loss_is_mse_plus_weighted_kl_and_reconstruction():
    model = make("vae").eval()  # eval: latent = mu, so every term is deterministic
    x, y = torch.randn(6, sum(SIZES)), torch.randn(6, 16)
    mu, logvar = model.encode(x)
    recon = model.decoder(mu)
    kl = -0.5 * torch.mean(1 + logvar - mu ** 2 - logvar.exp())
    want = torch.mean((mu - y) ** 2) + 0.01 * kl + 0.5 * torch.mean((recon - x) ** 2)
    torch.testing.assert_close(vae_loss(model, x, y, beta=0.01, gamma=0.5), want)


def test_gcn_node_features_padding_and_batch_independence():
    index = node_index(spec("gcn"))
    assert index.shape == (3, 9)
    assert index[0].tolist() == list(range(9))
    assert index[1].tolist() == list(range(9, 16)) + [23, 23]
    assert index[2].tolist() == list(range(16, 23)) + [23, 23]
    for pooling in ("mean", "flatten"):
        model = make("gcn", pooling=pooling)
        x = torch.randn(5, sum(SIZES))
        with torch.no_grad():
            torch.testing.assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(5)]))


def test_gcn_graph_errors():
    with pytest.raises(ValueError, match="negative weighted node degree"):
        GcnDecoder(torch.zeros(3, 2, dtype=torch.long), EDGE_INDEX, -EDGE_WEIGHT, out_dim=4)
    with pytest.raises(ValueError, match="pooling"):
        GcnDecoder(torch.zeros(3, 2, dtype=torch.long), EDGE_INDEX, EDGE_WEIGHT, out_dim=4, pooling="max")
    with pytest.raises(ValueError, match="not in input_rois"):
        node_index(DecoderSpec("gcn", "z", Z_SHAPE, ("V1",), (9,), {}, NODES))
    with pytest.raises(ValueError, match=r"input ROI\(s\) \['higher'\] belong to no graph node"):
        node_index(DecoderSpec("gcn", "z", Z_SHAPE, ROIS + ("higher",), SIZES + (5,), {}, NODES))
    with pytest.raises(ValueError, match="unknown decoder kind"):
        build_decoder(DecoderSpec("mlp", "z", Z_SHAPE, ROIS, SIZES, {}))


def test_checkpoint_roundtrip_and_destandardised_prediction(tmp_path):
    model = make("gcn")
    mean, std = torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, spec("gcn"), model, mean, std, json.dumps({"seed": 3}))
    ckpt = load_checkpoint(path)
    assert ckpt.spec == spec("gcn") and ckpt.config == {"seed": 3} and not ckpt.decoder.training
    x = torch.randn(4, sum(SIZES))
    with torch.no_grad():
        want = (model(x) * std + mean).reshape(4, *Z_SHAPE)
        torch.testing.assert_close(ckpt.predictor()(x), want)
    save_checkpoint(tmp_path / "again.safetensors", spec("gcn"), model, mean, std, json.dumps({"seed": 3}))
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the fit stage"):
        load_checkpoint(tmp_path / "none.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a brainldm decoder checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_destandardised_predictor_exports_in_target_shape(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", spec("cnn"), make("cnn"), torch.full((16,), 2.0),
                    torch.full((16,), 3.0), "{}")
    predictor = load_checkpoint(tmp_path / "m.safetensors").predictor()
    x = torch.randn(3, sum(SIZES))
    axes = {"voxels": {0: "batch"}, "z": {0: "batch"}}
    torch.onnx.export(predictor, (x,), str(tmp_path / "p.onnx"), dynamo=False, opset_version=18,
                      input_names=["voxels"], output_names=["z"], dynamic_axes=axes)
    xb = torch.randn(6, sum(SIZES))
    got = ort.InferenceSession(str(tmp_path / "p.onnx")).run(None, {"voxels": xb.numpy()})[0]
    with torch.no_grad():
        want = predictor(xb).numpy()
    assert got.shape == (6,) + Z_SHAPE
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
