import numpy as np
import pytest

from brainldm.train.data import roi_graph
from brainldm.train.data.roi_graph import GraphConfig

ROIS = {
    "V1": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]], np.float32),
    "V2": np.array([[7.0], [8.0], [9.0]], np.float32),
    "V3": np.array([[1.0], [0.0], [1.0]], np.float32),
    "hV4": np.array([[2.0, 2.0], [4.0, 4.0], [0.0, 6.0]], np.float32),
}


def test_node_features_concatenate_and_pad():
    feats = roi_graph.node_features(ROIS, roi_graph.DEFAULT_NODES)
    assert feats.shape == (3, 3, 3) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats[1, 0], [3, 4, 0])
    np.testing.assert_array_equal(feats[1, 1], [8, 0, 0])
    np.testing.assert_array_equal(feats[2, 2], [1, 0, 6])
    assert roi_graph.node_features(ROIS, [["V2"]], pad_length=4).shape == (3, 1, 4)
    with pytest.raises(ValueError, match="pad_length 2 is shorter"):
        roi_graph.node_features(ROIS, roi_graph.DEFAULT_NODES, pad_length=2)
    with pytest.raises(ValueError, match=r"unknown ROI\(s\) \['V4'\]"):
        roi_graph.node_features(ROIS, [["V1"], ["V4"]])


def test_node_means_exclude_padding():
    means = roi_graph.node_means(ROIS, roi_graph.DEFAULT_NODES)
    np.testing.assert_allclose(means[:, 0], [1.5, 3.5, 2.5])
    np.testing.assert_allclose(means[:, 2], [5 / 3, 8 / 3, 7 / 3])


def test_pearson_matrix_exact_and_constant_columns():
    x = np.array([[1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 1.0, 5.0], [3.0, 6.0, 2.0, 5.0]])
    r = roi_graph.pearson_matrix(x)
    np.testing.assert_allclose(r[0, 1], 1.0)
    np.testing.assert_allclose(r[0, 2], -0.5)
    np.testing.assert_allclose(r[3], [0, 0, 0, 1])


def test_edges_threshold_sign_and_self_loops():
    r = np.array([[1.0, 0.6, -0.4], [0.6, 1.0, 0.1], [-0.4, 0.1, 1.0]])
    idx, w = roi_graph.edges_from_correlation(r, GraphConfig(threshold=0.3))
    assert idx.tolist() == [[0, 0, 1, 2], [1, 2, 0, 0]]
    np.testing.assert_allclose(w, [0.6, 0.4, 0.6, 0.4])
    _, w = roi_graph.edges_from_correlation(r, GraphConfig(threshold=0.3, weight_mode="signed"))
    np.testing.assert_allclose(w, [0.6, -0.4, 0.6, -0.4])
    idx, w = roi_graph.edges_from_correlation(r, GraphConfig(threshold=0.0, weight_mode="positive", self_loops=True))
    assert idx.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 2, 1, 2]]
    np.testing.assert_allclose(w, [1.0, 0.6, 0.6, 1.0, 0.1, 0.1, 1.0])
    with pytest.raises(ValueError, match="weight_mode"):
        roi_graph.edges_from_correlation(r, GraphConfig(weight_mode="square"))


def test_build_graph():
    graph = roi_graph.build_graph(ROIS, GraphConfig())
    means = roi_graph.node_means(ROIS, roi_graph.DEFAULT_NODES)
    r = np.corrcoef(means.T)
    assert graph.pad_length == 3 and graph.node_rois == roi_graph.DEFAULT_NODES
    assert graph.edge_index.tolist() == [[0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]]
    np.testing.assert_allclose(graph.edge_weight, np.abs([r[0, 1], r[0, 2], r[1, 0], r[1, 2], r[2, 0], r[2, 1]]),
                               rtol=1e-6)
    assert graph.edge_weight.dtype == np.float32 and graph.edge_index.dtype == np.int64
