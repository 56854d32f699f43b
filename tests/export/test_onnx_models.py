import numpy as np
import pytest
import torch
from torch import nn

from brainldm.export import onnx_models as om


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x).reshape(-1, 3, 1)


def _spec(atol=1e-4):
    torch.manual_seed(0)
    return om.decoder_graph("mlp", _Mlp(), n_voxels=6, atol=atol, batch=3, seed=0)


def test_export_matches_torch_and_has_a_dynamic_batch(tmp_path):
    spec = _spec()
    path = tmp_path / "mlp.onnx"
    om.export_graph(spec, path, opset=18)
    errors = om.check_graph(spec, path)
    assert errors["pred"] <= 1e-6
    session = om.onnx_session(path)
    x = np.random.default_rng(1).standard_normal((7, 6)).astype(np.float32)
    with torch.no_grad():
        expected = spec.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, atol=1e-6)
    inputs, outputs = om.io_names(path)
    assert inputs[0].name == "x" and inputs[0].shape == (om.BATCH_AXIS, 6)
    assert outputs[0].shape[0] == om.BATCH_AXIS
    assert om.graph_files(path) == [path] and list(tmp_path.iterdir()) == [path]


def test_a_graph_that_disagrees_with_torch_fails_the_check(tmp_path):
    spec = _spec()
    path = tmp_path / "mlp.onnx"
    om.export_graph(spec, path, opset=18)
    with torch.no_grad():
        spec.module.net[0].bias.add_(1e-2)  # the torch module now differs from the exported graph
    with pytest.raises(om.ExportParityError, match="mlp.onnx.*exceeds the tolerance"):
        om.check_graph(spec, path)


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="opset 13 is too old"):
        om.export_graph(_spec(), tmp_path / "m.onnx", opset=13)


def test_large_graphs_keep_their_weights_in_one_external_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(om, "PROTOBUF_LIMIT_BYTES", 0)  # treat the tiny graph as if it were > 2 GB
    torch.manual_seed(0)
    spec = om.decoder_graph("mlp", nn.Linear(6, 64), n_voxels=6, atol=1e-4, batch=3, seed=0)  # 1.5 kB of weights
    path = tmp_path / "mlp.onnx"
    om.export_graph(spec, path, opset=18)
    data = tmp_path / "mlp.onnx.data"
    assert om.graph_files(path) == [path, data] and sorted(tmp_path.iterdir()) == [path, data]
    assert data.stat().st_size >= 64 * 6 * 4  # the weight matrix lives there
    assert om.check_graph(spec, path)["pred"] <= 1e-6
