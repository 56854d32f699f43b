"""The default bundle's image model on every CI run: the versioned small LDM (read from the
embedded DVC remote, exactly what dvc.lock pins), exported and run by the lean runtime with
the default generation settings (params.yaml: reconstruct, export, parity), against the
diffusers reference, step by step. The decoders are seeded stand-ins shaped to the model's
z and c (their own parity is checked at export and in test_parity)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from brainldm.export import parity
from brainldm.export import export
from brainldm.export.export import ExportConfig
from brainldm.train.config import load_config
from brainldm.train.reconstruction.reconstruct import ReconstructConfig
from tests.dvc_store import ROOT, materialize
from tests.export.tiny_bundle import DATASET, PAIR, TEST_IMAGES, make_configs

PARAMS = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def default_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("default_parity")
    model = materialize("train_ldm", "models/ldm", root / "ldm")
    defaults = load_config(ReconstructConfig, "reconstruct", PARAMS)
    ecfg, rc = make_configs(root, model=model)
    export_defaults = load_config(ExportConfig, "export", PARAMS)
    ecfg = dataclasses.replace(export_defaults, prepared_dir=ecfg.prepared_dir, targets_dir=ecfg.targets_dir,
                               models_dir=ecfg.models_dir, out_dir=ecfg.out_dir, checks_dir=ecfg.checks_dir,
                               tensorrt=False)
    rc = dataclasses.replace(rc, **{k: getattr(defaults, k) for k in ("steps", "strength", "guidance", "seed",
                                                                      "resolution", "encode_mode")})
    bundle = export.run(ecfg, rc, DATASET, PAIR)
    pcfg = dataclasses.replace(load_config(parity.ParityConfig, "parity", PARAMS), prepared_dir=ecfg.prepared_dir,
                               models_dir=ecfg.models_dir, bundles_dir=ecfg.out_dir,
                               results_dir=str(root / "results"), items=0)
    return bundle, pcfg, rc


def test_versioned_ldm_runtime_matches_reference(default_setup):
    bundle, pcfg, rc = default_setup
    m = parity.run(pcfg, rc, DATASET, PAIR)
    assert Path(bundle).is_dir() and m["n_items"] == len(TEST_IMAGES)
    assert len(m["latent_max_abs_per_step"]) == int(rc.steps * rc.strength)
    assert m["tolerances"]["judged_by"] == "max_abs" and m["tolerances"]["latent"] <= 1e-4
    assert m["latent_tolerance_ratio"] <= 1.0, m["latent_max_abs_per_step"]
    assert m["image_max_abs"] <= 1e-2 and m["passed"] is True
