"""Helpers of scripts/container_check.sh (run with the project's .venv Python).

    container_tools.py betas --prepared data/prepared/sim-nsd.h5 --images 4 --out FILE.npz
        the raw test trials (all repeats) of the first N test images, in the runtime's input
        layout (betas, session, group), written atomically.
    container_tools.py compare HOST_DIR CONTAINER_DIR
        the runtime's outputs of two runs: same PNG names, pixel-identical images, same index.csv.
    container_tools.py scan-rootfs ROOT --target runtime|artifact [--secret-file CA]
        the final image's filesystem: no project tests/data/outputs, no caches, no build tools,
        no pip in the venv, no credentials, no copy of the CA bundle.
    container_tools.py scan-layers OCI_DIR [--secret-file CA]
        every layer of the saved image (deleted files included): no /run/secrets entries, no
        copy of the CA bundle.

    container_tools.py summary FILE.json
        one line for a human, from any of the JSON results above.

Each check prints one JSON object and exits 1 when the check fails (2 on bad usage).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from brainldm.runtime.bundle_format import file_sha256

# Where installed Python packages keep their bytecode: allowed there, nowhere else.
BYTECODE_OK = ("opt/venv/", "usr/lib/python3", "usr/local/lib/python3")
BUILD_TOOLS = ("gcc", "cc", "c++", "g++", "clang", "make", "cmake", "ld", "as")
CREDENTIAL_NAMES = (".netrc", ".pypirc", ".git-credentials", ".env", "config.local", "id_rsa", "id_ed25519",
                    ".dockercfg", "auth.json")
# The CA bundle the image's own ca-certificates package generates (not a copy of the secret).
OWN_CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"


def write_betas(prepared: Path, images: int, out: Path) -> dict:
    import h5py
    import numpy as np

    if not prepared.is_file():
        raise FileNotFoundError(f"{prepared} not found: it is a pipeline output (dvc pull / dvc repro prepare)")
    with h5py.File(prepared, "r") as f:
        betas = np.asarray(f["raw_test/betas"])
        session = np.asarray(f["raw_test/session"])
        group = np.asarray(f["raw_test/image_index"])
    chosen = np.unique(group)[:images]
    keep = np.isin(group, chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, betas=betas[keep], session=session[keep], group=group[keep])
        os.chmod(tmp, 0o644)  # readable by the image's unprivileged user
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"file": str(out), "trials": int(keep.sum()), "images": chosen.tolist(), "voxels": int(betas.shape[1])}


def compare_outputs(host: Path, container: Path) -> dict:
    import numpy as np
    from PIL import Image

    host_pngs = sorted(p.name for p in host.glob("*.png"))
    cont_pngs = sorted(p.name for p in container.glob("*.png"))
    result = {"host_images": len(host_pngs), "container_images": len(cont_pngs), "same_names": host_pngs == cont_pngs,
              "max_abs_diff": None, "differing_images": [], "index_csv_equal": None}
    if not host_pngs:
        result["error"] = f"no PNG in {host}"
    diffs = []
    for name in sorted(set(host_pngs) & set(cont_pngs)):
        a = np.asarray(Image.open(host / name), dtype=np.int16)
        b = np.asarray(Image.open(container / name), dtype=np.int16)
        if a.shape != b.shape:
            result["differing_images"].append(name)
            continue
        d = int(np.abs(a - b).max()) if a.size else 0
        diffs.append(d)
        if d:
            result["differing_images"].append(name)
    result["max_abs_diff"] = max(diffs) if diffs else None
    index_h, index_c = host / "index.csv", container / "index.csv"
    result["index_csv_equal"] = index_h.is_file() and index_c.is_file() and index_h.read_bytes() == index_c.read_bytes()
    result["identical"] = bool(host_pngs and result["same_names"] and not result["differing_images"]
                               and result["index_csv_equal"])
    return result


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _expected_layout_problems(root: Path, target: str) -> list[str]:
    """Paths that must (not) exist in the image: build leftovers, the project (artifact only), build tools."""
    problems: list[str] = []
    must_not_exist = ["src", "opt/dist", "opt/build", "root/.cache", "home/brainldm/.cache",
                      "opt/venv/bin/pip", "opt/venv/bin/pip3"]
    project = "opt/brainldm"
    if target == "artifact":
        must_not_exist += [f"{project}/{d}" for d in ("tests", "data", "models", "bundles", "results", "bench",
                                                      ".git", ".venv", ".dvc/cache", ".dvc/tmp", ".dvc/config.local",
                                                      ".pytest_cache", "tmp")]
        for needed in ("dvc.yaml", "dvc.lock", "params.yaml", "data.dvc", ".dvc/config", "dvc-store",
                       "scripts/artifact_reproduce.sh"):
            if not (root / project / needed).exists():
                problems.append(f"missing {project}/{needed}")
    else:
        must_not_exist += [project]
    for rel in must_not_exist:
        if (root / rel).exists() or (root / rel).is_symlink():
            problems.append(f"present: /{rel}")
    secrets_dir = root / "run" / "secrets"
    if secrets_dir.is_dir() and any(secrets_dir.iterdir()):
        problems.append("present: files in /run/secrets")
    for tool in BUILD_TOOLS:
        for bindir in ("usr/bin", "usr/local/bin", "bin"):
            if (root / bindir / tool).exists():
                problems.append(f"build tool: /{bindir}/{tool}")
    return problems


def _walk(root: Path):
    """Yield (relative path, path, is_dir) for everything under ``root`` except /proc, /sys and /dev."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d not in ("proc", "sys", "dev")]
        rel_dir = _rel(root, here) if here != root else ""
        for names, is_dir in ((dirnames, True), (filenames, False)):
            for name in names:
                yield f"{rel_dir}/{name}".lstrip("/"), here / name, is_dir


def _is_secret_copy(path: Path, secret: Path, secret_size: int, secret_sha: str) -> bool:
    """Whether the regular file ``path`` has the CA bundle's size and sha256 (size first: cheap)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        same_size = path.stat().st_size == secret_size
    except OSError:
        return False
    return same_size and file_sha256(path) == secret_sha


def scan_rootfs(root: Path, target: str, secret: Path | None = None) -> dict:
    """Problems found in an image's root filesystem (empty list = clean)."""
    problems = _expected_layout_problems(root, target)
    secret_size = secret.stat().st_size if secret else None
    secret_sha = file_sha256(secret) if secret else None
    own_ca_equals_secret = False
    files = 0
    for rel, path, is_dir in _walk(root):
        name = path.name
        if is_dir:
            if name in (".git", ".venv", ".pytest_cache") or (name == ".cache" and not rel.startswith("opt/venv/")):
                problems.append(f"present: /{rel}")
            if name == "__pycache__" and not rel.startswith(BYTECODE_OK):
                problems.append(f"bytecode cache outside installed packages: /{rel}")
            continue
        files += 1
        if name in CREDENTIAL_NAMES:
            problems.append(f"credential-like file: /{rel}")
        if name.endswith(".pyc") and not rel.startswith(BYTECODE_OK):
            problems.append(f"bytecode outside installed packages: /{rel}")
        if secret is not None and _is_secret_copy(path, secret, secret_size, secret_sha):
            if rel == OWN_CA_BUNDLE:
                own_ca_equals_secret = True
            else:
                problems.append(f"copy of the CA bundle: /{rel}")
    return {"root": str(root), "target": target, "files": files, "problems": problems, "clean": not problems,
            "own_ca_bundle_equals_secret": own_ca_equals_secret}


def _layer_files(oci_dir: Path) -> list[Path]:
    """Layer blobs of an image saved with `podman save --format oci-dir` (or docker-dir)."""
    index = oci_dir / "index.json"
    if index.is_file():
        manifest_digest = json.loads(index.read_text())["manifests"][0]["digest"]
        algo, digest = manifest_digest.split(":", 1)
        manifest = json.loads((oci_dir / "blobs" / algo / digest).read_text())
        return [oci_dir / "blobs" / layer["digest"].split(":")[0] / layer["digest"].split(":")[1]
                for layer in manifest["layers"]]
    manifest = json.loads((oci_dir / "manifest.json").read_text())
    return [oci_dir / layer["digest"].split(":")[1] for layer in manifest["layers"]]


def _open_layer(path: Path) -> tarfile.TarFile:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return tarfile.open(fileobj=gzip.open(path, "rb"), mode="r|")
    return tarfile.open(path, mode="r|")


def scan_layers(oci_dir: Path, secret: Path | None = None) -> dict:
    problems: list[str] = []
    secret_bytes = secret.read_bytes() if secret else None
    own_ca_equals_secret = False
    layers = _layer_files(oci_dir)
    members = 0
    for i, layer in enumerate(layers):
        with _open_layer(layer) as tar:
            for member in tar:
                members += 1
                name = member.name.lstrip("./")
                if name.startswith("run/secrets/") and not name.endswith(("/", ".wh..wh..opq")):
                    problems.append(f"layer {i}: /{name}")
                if secret_bytes is not None and member.isfile() and member.size == len(secret_bytes):
                    data = tar.extractfile(member).read()
                    if data == secret_bytes:
                        if name == OWN_CA_BUNDLE:
                            own_ca_equals_secret = True
                        else:
                            problems.append(f"layer {i}: copy of the CA bundle at /{name}")
    return {"layers": len(layers), "members": members, "problems": problems, "clean": not problems,
            "own_ca_bundle_equals_secret": own_ca_equals_secret}


def summary(result: dict) -> str:
    """One line describing a JSON result of the commands above."""
    if "identical" in result:
        verdict = "IDENTICAL" if result["identical"] else "DIFFERENT"
        return (f"{verdict}: {result['container_images']} container vs {result['host_images']} host PNGs, "
                f"max abs pixel difference {result['max_abs_diff']}, index.csv equal: {result['index_csv_equal']}"
                + (f", differing: {result['differing_images'][:5]}" if result["differing_images"] else ""))
    if "trials" in result:
        return f"{result['trials']} raw test trials of test images {result['images']} ({result['voxels']} voxels)"
    head = "clean" if result["clean"] else "PROBLEMS: " + "; ".join(result["problems"][:20])
    if "layers" in result:
        head += f" ({result['layers']} layers, {result['members']} entries scanned"
    else:
        head += f" ({result['files']} files scanned"
    if result.get("own_ca_bundle_equals_secret"):
        head += "; the image's own /etc/ssl/certs/ca-certificates.crt equals the CA bundle"
    return head + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="container_tools.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("betas")
    p.add_argument("--prepared", type=Path, required=True)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("compare")
    p.add_argument("host", type=Path)
    p.add_argument("container", type=Path)
    p = sub.add_parser("scan-rootfs")
    p.add_argument("root", type=Path)
    p.add_argument("--target", choices=("runtime", "artifact"), required=True)
    p.add_argument("--secret-file", type=Path)
    p = sub.add_parser("scan-layers")
    p.add_argument("oci_dir", type=Path)
    p.add_argument("--secret-file", type=Path)
    p = sub.add_parser("summary")
    p.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "summary":
            print(summary(json.loads(args.file.read_text())))
            return 0
        if args.command == "betas":
            result, ok = write_betas(args.prepared, args.images, args.out), True
        elif args.command == "compare":
            result = compare_outputs(args.host, args.container)
            ok = result["identical"]
        elif args.command == "scan-rootfs":
            result = scan_rootfs(args.root, args.target, args.secret_file)
            ok = result["clean"]
        else:
            result = scan_layers(args.oci_dir, args.secret_file)
            ok = result["clean"]
    except (OSError, KeyError, ValueError) as exc:
        print(f"container_tools {args.command}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
