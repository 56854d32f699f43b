"""train/distributed.py in one process (what dvc.yaml runs): no process group, every helper the
identity; torchrun's environment and the ``device`` option validated; fit on CUDA (gpu marker).
Multi-process runs: tests/train/test_torchrun.py."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist

from brainldm.train import distributed
from brainldm.train.decoding.decoders import load_checkpoint
from brainldm.train.decoding import fit
from brainldm.train.decoding.fit import main
from tests.train.decoding.test_fit import DECODERS, FAST_OPTIM, fit_config, make_fake_data

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
DEVICE_ERROR = r"fit\.device: got {!r}, expected 'cpu', 'cuda' or 'auto'"


@pytest.fixture(autouse=True)
def no_torchrun(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_one_process_helpers_are_the_identity():
    rows = torch.arange(5)
    module = torch.nn.Linear(2, 2)
    assert distributed.shard(rows) is rows and distributed.wrap(module, torch.device("cpu")) is module
    assert distributed.sum_across([1.5, 3]) == [1.5, 3]
    assert distributed.mean_across(torch.tensor(0.25, requires_grad=True) * 2) == 0.5
    assert distributed.rank0_decides(True) is True and distributed.rank0_decides(False) is False
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.broadcast_buffers(module)
    distributed.join_process_group(torch.device("cpu"))
    assert not dist.is_initialized() and distributed.is_main() and distributed.world_size() == 1


def test_world_size_one_is_the_default_path_byte_for_byte(tmp_path, monkeypatch):
    """``torchrun --nproc_per_node 1`` sets WORLD_SIZE=1: no process group, the same checkpoint bytes."""
    entry = dict(DECODERS["cnn-z"], optim=dict(FAST_OPTIM, max_epochs=3))
    blobs = []
    for env in ({}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        make_fake_data(tmp_path)  # the same paths: the same metadata
        fit.run(fit_config(tmp_path, **{"cnn-z": entry}), "fake", "cnn-z")
        blobs.append((tmp_path / "models" / "fake" / "cnn-z.safetensors").read_bytes())
        assert not dist.is_initialized()
    assert blobs[0] == blobs[1]
    assert "device" not in load_checkpoint(tmp_path / "models" / "fake" / "cnn-z.safetensors").config


@pytest.mark.parametrize("bad", ["gpu", "CUDA", ""])
def test_device_must_be_cpu_cuda_or_auto(bad):
    with pytest.raises(ValueError, match="^" + DEVICE_ERROR.format(bad) + "$"):
        distributed.resolve_device(bad, "fit.device")


def test_fit_reports_a_bad_device_in_one_line(tmp_path, capsys):
    root = make_fake_data(tmp_path)
    section = {"prepared_dir": str(root / "prepared"), "targets_dir": str(root / "targets"),
               "models_dir": str(root / "models"), "results_dir": str(root / "results"), "threads": 1,
               "std_floor": 1e-6, "device": "gpu", "decoders": {"cnn-z": DECODERS["cnn-z"]}}
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"fit": section}))
    assert main(["--params", str(params), "--dataset", "fake", "--decoder", "cnn-z"]) == 1
    err = capsys.readouterr().err
    assert err == "error: fit.device: got 'gpu', expected 'cpu', 'cuda' or 'auto'\n"
    assert not (root / "models").exists()
    section.pop("device")  # params.yaml states every knob
    params.write_text(json.dumps({"fit": section}))
    assert main(["--params", str(params), "--dataset", "fake", "--decoder", "cnn-z"]) == 1
    assert "missing required key(s) ['device']" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a host without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="^fit.device: 'cuda' requested but no CUDA device is available$"):
        distributed.resolve_device("cuda", "fit.device")
    assert distributed.resolve_device("auto", "fit.device") == torch.device("cpu")


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_bad_torchrun_environment_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ValueError, match=f"environment WORLD_SIZE='{value}': expected an integer >= 1"):
        distributed.launched_world_size()


def test_ridge_and_uneven_batches_are_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="^fit.decoders.ridge-z: ridge is solved in closed form"):
        fit.run(fit_config(make_fake_data(tmp_path)), "fake", "ridge-z")
    with pytest.raises(ValueError, match="^train_ldm.vae.batch_size: 4 is not divisible by the 3 torchrun processes$"):
        distributed.check_shardable(4, "train_ldm.vae.batch_size")
    distributed.check_shardable(6, "train_ldm.vae.batch_size")
    assert not dist.is_initialized()


def test_only_rank_0_prints(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with distributed.quiet_unless_main():
        print("rank 1")
    monkeypatch.setenv("RANK", "0")
    with distributed.quiet_unless_main():
        print("rank 0")
    assert capsys.readouterr().out == "rank 0\n"


@pytest.mark.gpu
def test_fit_a_cnn_decoder_on_cuda(tmp_path):
    root = make_fake_data(tmp_path)
    config = fit_config(root, **{"cnn-z": DECODERS["cnn-z"]})
    on_cpu = fit.run(config, "fake", "cnn-z")
    cuda = dataclasses.replace(config, device="cuda", models_dir=str(root / "cuda-models"),
                               results_dir=str(root / "cuda-results"))
    on_cuda = fit.run(cuda, "fake", "cnn-z")
    ckpt = load_checkpoint(root / "cuda-models" / "fake" / "cnn-z.safetensors")
    assert ckpt.config["device"] == "cuda" and ckpt.target_mean.device.type == "cpu"
    assert on_cuda["identification"] > 0.9 and on_cuda["pearson_dim"] > 0.5
    # the same recipe on other kernels: close, not bitwise (0.25 as tests/train/test_torchrun.py's VAL_RTOL)
    assert on_cuda["mse"] == pytest.approx(on_cpu["mse"], rel=0.25)
