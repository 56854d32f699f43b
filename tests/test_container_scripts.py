"""The scripts the images run and are checked with (static: no container engine needed).

scripts/artifact_reproduce.sh (the artifact image's default command, run with a fake dvc),
scripts/container_check.sh (parses, documents itself) and its helpers in
scripts/container_tools.py that compare host and container outputs and scan image
filesystems and layers. The images are built and run by scripts/container_check.sh
(README "Docker"); the Dockerfile itself is checked in test_docker.py.
"""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import container_tools  # noqa: E402  (scripts/ is not a package)


# ---- the artifact image's default command --------------------------------------------------------

FAKE_DVC = """#!/usr/bin/env bash
echo "$*" >> "$DVC_CALLS"
"""


def _fake_project(tmp_path: Path) -> Path:
    src = tmp_path / "opt"
    for rel in ("dvc.yaml", "dvc.lock", "params.yaml", "data.dvc", ".dvc/config", "train/a.py", "export/b.py",
                "runtime/c.py", "dvc-store/files/x"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"{rel}\n")
    return src


def _run_artifact(tmp_path: Path, src: Path, ws: Path, *args: str, **env_extra: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "dvc").write_text(FAKE_DVC)
    (bin_dir / "dvc").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", BRAINLDM_HOME=str(src),
               BRAINLDM_WORKSPACE=str(ws), DVC_CALLS=str(tmp_path / "calls.txt"), **env_extra)
    return subprocess.run([str(ROOT / "scripts" / "artifact_reproduce.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_artifact_command_copies_the_project_and_runs_dvc(tmp_path):
    src, ws = _fake_project(tmp_path), tmp_path / "ws"
    proc = _run_artifact(tmp_path, src, ws, "simulate")
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == ["config --local core.no_scm true", f"remote modify --local embedded url {src}/dvc-store",
                     "pull --quiet -r embedded data.dvc train_ldm", "repro simulate", "metrics show"]
    assert (ws / "train" / "a.py").read_text() == "train/a.py\n" and (ws / ".dvc" / "config").is_file()
    assert not (ws / "dvc-store").exists() and not list(ws.glob(".tmp-copy-*"))


def test_artifact_command_keeps_workspace_files_and_takes_params(tmp_path):
    src, ws = _fake_project(tmp_path), tmp_path / "ws"
    ws.mkdir()
    (ws / "dvc.lock").write_text("mine\n")
    params = tmp_path / "real.yaml"
    params.write_text("prepare: {}\n")
    proc = _run_artifact(tmp_path, src, ws, BRAINLDM_PARAMS=str(params), BRAINLDM_PULL="")
    assert proc.returncode == 0, proc.stderr
    assert (ws / "dvc.lock").read_text() == "mine\n"
    assert (ws / "params.yaml").read_text() == "prepare: {}\n"
    assert not any(c.startswith("pull") for c in (tmp_path / "calls.txt").read_text().splitlines())


def test_artifact_command_refuses_changed_code(tmp_path):
    src, ws = _fake_project(tmp_path), tmp_path / "ws"
    (ws / "train").mkdir(parents=True)
    (ws / "train" / "a.py").write_text("edited\n")
    proc = _run_artifact(tmp_path, src, ws)
    assert proc.returncode == 1
    assert "differs from the image's code" in proc.stderr
    assert not (tmp_path / "calls.txt").exists()


# ---- scripts/container_check.sh and its helpers ---------------------------------------------------

def test_container_check_script_parses_and_documents_itself():
    script = ROOT / "scripts" / "container_check.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and "--artifact" in help_text.stdout and "debootstrap" in help_text.stdout
    bad = subprocess.run([str(script), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def _png(path: Path, value: int) -> None:
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def test_compare_finds_equal_and_different_outputs(tmp_path):
    host, cont = tmp_path / "host", tmp_path / "cont"
    for d in (host, cont):
        d.mkdir()
        (d / "index.csv").write_text("item,group,sample,file\n0,1,0,item0000_s0.png\n")
        _png(d / "item0000_s0.png", 10)
    assert container_tools.compare_outputs(host, cont)["identical"]
    _png(cont / "item0000_s0.png", 13)
    result = container_tools.compare_outputs(host, cont)
    assert not result["identical"] and result["max_abs_diff"] == 3
    assert "DIFFERENT" in container_tools.summary(result)
    _png(cont / "item0000_s0.png", 10)
    (cont / "item0001_s0.png").write_bytes((cont / "item0000_s0.png").read_bytes())
    assert not container_tools.compare_outputs(host, cont)["identical"]


def _clean_rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    for rel in ("opt/venv/bin/python", "opt/venv/lib/python3.11/site-packages/numpy/__pycache__/x.pyc",
                "usr/bin/python3.11", "etc/ssl/certs/ca-certificates.crt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_scan_rootfs_passes_a_clean_tree_and_finds_leftovers(tmp_path):
    secret = tmp_path / "ca.crt"
    secret.write_text("-----BEGIN CERTIFICATE----- proxy\n")
    root = _clean_rootfs(tmp_path)
    assert container_tools.scan_rootfs(root, "runtime", secret)["clean"]
    planted = {"opt/venv/bin/pip": "x", "root/.cache/pip/http/a": "x", "usr/local/share/ca.crt": secret.read_text(),
               "usr/bin/gcc": "x", "home/brainldm/.netrc": "x", "opt/brainldm/train/__pycache__/a.pyc": "x"}
    for rel, text in planted.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    problems = " ".join(container_tools.scan_rootfs(root, "runtime", secret)["problems"])
    for needle in ("/opt/venv/bin/pip", "/root/.cache", "copy of the CA bundle: /usr/local/share/ca.crt",
                   "/usr/bin/gcc", ".netrc", "/opt/brainldm"):
        assert needle in problems


def test_scan_rootfs_artifact_needs_the_project_without_tests(tmp_path):
    root = _clean_rootfs(tmp_path)
    project = root / "opt" / "brainldm"
    for rel in ("dvc.yaml", "dvc.lock", "params.yaml", "data.dvc", ".dvc/config", "dvc-store/files/x",
                "scripts/artifact_reproduce.sh"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(rel)
    assert container_tools.scan_rootfs(root, "artifact")["clean"]
    (project / "tests").mkdir()
    (project / "data" / "prepared").mkdir(parents=True)
    problems = container_tools.scan_rootfs(root, "artifact")["problems"]
    assert "present: /opt/brainldm/tests" in problems and "present: /opt/brainldm/data" in problems


def _oci_layout(tmp_path: Path, members: dict[str, bytes]) -> Path:
    oci = tmp_path / "oci"
    blobs = oci / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (blobs / "aa").write_bytes(buffer.getvalue())
    (blobs / "mm").write_text(json.dumps({"layers": [{"digest": "sha256:aa"}]}))
    (oci / "index.json").write_text(json.dumps({"manifests": [{"digest": "sha256:mm"}]}))
    return oci


def test_scan_layers_finds_secrets_in_any_layer(tmp_path):
    secret = tmp_path / "ca.crt"
    secret.write_bytes(b"proxy ca\n")
    clean = _oci_layout(tmp_path / "a", {"opt/venv/bin/python": b"x", "etc/ssl/certs/ca-certificates.crt": b"proxy ca\n"})
    result = container_tools.scan_layers(clean, secret)
    assert result["clean"] and result["own_ca_bundle_equals_secret"]
    dirty = _oci_layout(tmp_path / "b", {"run/secrets/ca_bundle": b"proxy ca\n", "tmp/ca.pem": b"proxy ca\n"})
    problems = " ".join(container_tools.scan_layers(dirty, secret)["problems"])
    assert "/run/secrets/ca_bundle" in problems and "copy of the CA bundle at /tmp/ca.pem" in problems


def test_betas_input_is_written_atomically(tmp_path):
    import h5py

    prepared = tmp_path / "p.h5"
    with h5py.File(prepared, "w") as f:
        f["raw_test/betas"] = np.arange(12, dtype=np.float32).reshape(6, 2)
        f["raw_test/session"] = np.ones(6, np.int64)
        f["raw_test/image_index"] = np.array([5, 3, 5, 9, 3, 7])
    out = tmp_path / "in" / "betas.npz"
    info = container_tools.write_betas(prepared, 2, out)
    assert info["images"] == [3, 5] and info["trials"] == 4
    with np.load(out) as data:
        assert data["group"].tolist() == [5, 3, 5, 3] and data["betas"].shape == (4, 2)
    assert [p.name for p in out.parent.iterdir()] == ["betas.npz"]
    with pytest.raises(FileNotFoundError):
        container_tools.write_betas(tmp_path / "missing.h5", 2, tmp_path / "x.npz")
    assert stat.S_ISREG(out.stat().st_mode)
