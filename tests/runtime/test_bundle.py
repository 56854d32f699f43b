import dataclasses
import json
import shutil

import numpy as np
import pytest

from brainldm.runtime import bundle as bl
from brainldm.runtime import bundle_format as bf
from brainldm.runtime import cli
from brainldm.runtime.reconstructor import Reconstructor
from tests.export.tiny_bundle import N_VOXELS, SESSIONS, build_tiny_bundle, raw_test


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def copy(bundle_dir, tmp_path):
    return shutil.copytree(bundle_dir, tmp_path / "b")


@pytest.fixture
def edit(copy):
    """Apply ``change(manifest_data)`` to the manifest.json of a copy of the bundle; returns the copy."""
    def apply(change):
        data = json.loads((copy / bf.MANIFEST).read_text())
        change(data)
        (copy / bf.MANIFEST).write_text(json.dumps(data))
        return copy
    return apply


def test_loads_and_validates(bundle_dir):
    b = bl.load_bundle(bundle_dir)
    assert b.voxel_ids.shape == (N_VOXELS,) and b.sessions.tolist() == list(SESSIONS)
    assert b.mean.shape == b.std.shape == (len(SESSIONS), N_VOXELS) and b.mean.dtype == np.float32
    assert b.columns["z"].shape == (30,) and b.columns["c"].shape == (20,)
    assert b.uncond.shape == (5, 16) and b.alphas_cumprod.shape == (1000,)
    assert b.model_path("unet").name == "unet.onnx" and b.model_path("unet").is_file()
    with pytest.raises(bl.BundleError, match="no model 'clip'"):
        b.model_path("clip")
    with pytest.raises(bl.BundleError, match="no fp16 variant"):
        b.model_path("unet", fp16=True)


def test_tampered_file_is_named(copy):
    with open(copy / "models" / "unet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(bl.BundleError, match="sha256 mismatch for models/unet.onnx"):
        bl.load_bundle(copy)
    bl.load_bundle(copy, verify=False)  # the hash check is what caught it


def test_missing_file_and_other_format_version(copy):
    (copy / "arrays" / "uncond.npy").unlink()
    with pytest.raises(bl.BundleError, match="arrays/uncond.npy listed in the manifest is missing"):
        bl.load_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bl.BundleError, match="format_version 2 is not supported.*reads format_version 1"):
        bl.load_bundle(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(bl.BundleError, match="bundle folder not found"):
        bl.load_bundle(tmp_path / "nope")
    with pytest.raises(bl.BundleError, match="has no manifest.json"):
        bl.load_bundle(tmp_path)


def test_inconsistent_shapes_are_caught(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    np.save(copy / "arrays" / "norm_std.npy", np.ones((1, N_VOXELS), np.float32))
    manifest["files"]["arrays/norm_std.npy"] = bl.file_sha256(copy / "arrays" / "norm_std.npy")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bl.BundleError, match=r"std has shape \(1, 30\); the manifest implies \(2, 30\)"):
        bl.load_bundle(copy)


def _tamper(bundle_dir, rel="models/unet.onnx"):
    """Append one byte to a listed file: its size and hash change, the graph may even still load."""
    with open(bundle_dir / rel, "ab") as f:
        f.write(b"\0")


def test_reconstructor_verifies_hashes_by_default(copy):
    _tamper(copy)
    with pytest.raises(bl.BundleError, match="sha256 mismatch for models/unet.onnx"):
        Reconstructor(copy, threads=1)


def test_cli_verifies_hashes_by_default(copy, tmp_path, capsys):
    _tamper(copy)
    raw = raw_test()
    np.savez(tmp_path / "in.npz", betas=raw["betas"], session=raw["session"], group=raw["image_index"])
    args = ["reconstruct", "--bundle", str(copy), "--betas", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out"),
            "--threads", "1"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sha256 mismatch for models/unet.onnx" in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert not (tmp_path / "out").exists()  # the bundle is checked before the output folder is made



@pytest.mark.parametrize("verify", [True, False])
def test_model_missing_from_the_file_table_is_refused(copy, verify):
    # a graph that is not in the file table would escape the hash check entirely
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["models/unet.onnx"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bl.BundleError, match="model 'unet' file models/unet.onnx is not listed"):
        bl.load_bundle(copy, verify=verify)


def test_damaged_graph_without_verification_is_one_clear_error(copy):
    (copy / "models" / "unet.onnx").write_bytes(b"not an onnx graph")
    from brainldm.runtime.backends import BackendError
    with pytest.raises(BackendError, match=r"unet.onnx: ONNX Runtime cannot load this graph"):
        Reconstructor(copy, threads=1, verify=False)


# ---- the typed manifest (runtime/bundle_format.py): a missing, mistyped or unknown field is named ----

def test_the_typed_manifest_reproduces_the_exported_bytes(bundle_dir):
    text = (bundle_dir / bf.MANIFEST).read_text(encoding="utf-8")
    manifest = bf.read_manifest(bundle_dir)
    assert bf.manifest_json(manifest) == text
    assert manifest.image_model.latent_shape == (4, 4, 4) and isinstance(manifest.generation.strength, float)
    assert manifest.models["unet"].fp16_file is None and "fp16_file" not in json.loads(text)["models"]["unet"]
    assert sorted(manifest.models) == sorted(bf.MODEL_NAMES) and sorted(manifest.decoders) == sorted(bf.DECODER_KEYS)
    assert manifest.models["unet"].file == bf.model_file("unet") and manifest.uncond == bf.array_file("uncond")


def test_a_missing_field_is_named(edit):
    copy = edit(lambda m: m["image_model"].pop("resolution"))
    with pytest.raises(bf.BundleError, match=r"manifest.json: manifest field 'image_model.resolution' is missing; "
                                             r"expected an integer"):
        bl.load_bundle(copy)


def test_a_missing_object_is_named_with_its_fields(edit):
    copy = edit(lambda m: m.pop("generation"))
    with pytest.raises(bf.BundleError, match=r"'generation' is missing; expected an object with the fields "
                                             r"\['steps', 'strength'"):
        bl.load_bundle(copy, verify=False)


@pytest.mark.parametrize("path, value, expected", [
    (("generation", "steps"), "10", r"'generation.steps' is '10'; expected an integer"),
    (("input", "n_voxels"), True, r"'input.n_voxels' is True; expected an integer"),
    (("image_model", "scaling_factor"), "0.18", r"'image_model.scaling_factor' is '0.18'; expected a number"),
    (("models", "unet", "inputs", 0, "shape", 1), 4.5,
     r"'models.unet.inputs\[0\].shape\[1\]' is 4.5; expected an integer or a string or null"),
    (("decoders", "z", "input_rois"), "A", r"'decoders.z.input_rois' is 'A'; expected a list of a string"),
    (("files",), [], r"'files' is \[\]; expected an object of a string"),
    (("graph",), 3, r"'graph' is 3; expected an object with the fields \['edge_index'.* or null"),
])
def test_a_mistyped_field_is_named(edit, path, value, expected):
    def change(m):
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value
    with pytest.raises(bf.BundleError, match=expected):
        bl.load_bundle(edit(change), verify=False)


def test_an_unknown_field_is_refused(edit):
    copy = edit(lambda m: m["generation"].update(eta=0.0))
    with pytest.raises(bf.BundleError, match=r"'generation.eta' is not part of bundle format_version 1"):
        bl.load_bundle(copy, verify=False)


def test_the_contracts_models_and_decoders_must_all_be_there(edit):
    copy = edit(lambda m: m["models"].pop("vae_encoder"))
    with pytest.raises(bf.BundleError, match=r"lists the models \['c_decoder', 'unet', 'vae_decoder', 'z_decoder'\]"):
        bl.load_bundle(copy, verify=False)


def test_export_refuses_to_write_a_manifest_the_runtime_would_refuse(bundle_dir, tmp_path):
    manifest = bf.read_manifest(bundle_dir)
    broken = dataclasses.replace(manifest, generation=dataclasses.replace(manifest.generation, steps="50"))
    with pytest.raises(bf.BundleError, match="'generation.steps' is '50'; expected an integer"):
        bf.write_manifest(tmp_path, broken)
    assert not (tmp_path / bf.MANIFEST).exists()
    assert bf.write_manifest(tmp_path, manifest).read_text(encoding="utf-8") == (bundle_dir / bf.MANIFEST).read_text()
