import dataclasses
import json
import shutil

import h5py
import pytest
import yaml

from brainldm.export import parity
from brainldm.export import export
from brainldm.train.config import config_to_dict
from tests.export.tiny_bundle import DATASET, PAIR, TEST_IMAGES, make_configs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    ecfg, rc = make_configs(root, fp16=True)
    export.run(ecfg, rc, DATASET, PAIR)
    cfg = parity.ParityConfig(prepared_dir=ecfg.prepared_dir, models_dir=ecfg.models_dir, bundles_dir=ecfg.out_dir,
                              results_dir=str(root / "results"), items=0, samples=2, batch_size=3)
    return root, cfg, rc


def test_runtime_matches_reference_step_by_step(setup):
    _, cfg, rc = setup
    m = parity.run(cfg, rc, DATASET, PAIR)
    assert m["n_items"] == len(TEST_IMAGES) and m["samples"] == 2
    assert m["pred_z_max_abs"] <= 1e-5 and m["pred_c_max_abs"] <= 1e-5
    assert len(m["latent_max_abs_per_step"]) == 8  # strength 0.8 of 10 steps
    assert m["latent_max_abs"] <= 1e-4
    # the VAE round trip and the whole chain are reported too (each side from its own predictions)
    assert 0 < m["init_latent_max_abs"] <= 1e-3 and m["end_to_end_latent_max_abs"] >= m["latent_max_abs"] / 10
    assert m["image_max_abs"] <= 1e-2 and m["uint8_max_abs"] <= 1
    assert m["passed"] is True and m["tolerances"]["judged_by"] == "max_abs"
    assert m["image_psnr_db"] > 60


def test_fp16_graphs_are_judged_by_psnr(setup):
    _, cfg, rc = setup
    m = parity.run(dataclasses.replace(cfg, fp16=True, items=2), rc, DATASET, PAIR)
    assert m["tolerances"]["judged_by"] == "psnr"
    assert m["latent_max_abs"] > 1e-4  # fp16 cannot meet the fp32 tolerance ...
    assert cfg.psnr_min <= m["image_psnr_db"] < 90 and m["passed"]  # ... but the images agree


def test_stage_writes_metrics_and_refuses_other_settings(setup, tmp_path, capsys):
    root, cfg, rc = setup
    params = tmp_path / "params.yaml"
    sections = {"parity": config_to_dict(cfg) | {"items": 1, "samples": 1}, "reconstruct": config_to_dict(rc)}
    params.write_text(yaml.safe_dump(sections))
    assert parity.main(["--params", str(params), "--dataset", DATASET, "--pair", PAIR]) == 0
    metrics = json.loads((root / "results" / f"{DATASET}-{PAIR}.json").read_text())
    assert metrics["passed"] and metrics["n_items"] == 1
    sections["reconstruct"]["guidance"] = 7.5
    params.write_text(yaml.safe_dump(sections))
    assert parity.main(["--params", str(params), "--dataset", DATASET, "--pair", PAIR]) == 1
    assert "other generation settings" in capsys.readouterr().err


def test_a_failed_verdict_and_a_missing_key_are_one_error_line(setup, tmp_path, capsys):
    root, cfg, rc = setup
    params = tmp_path / "params.yaml"
    strict = config_to_dict(cfg) | {"items": 1, "samples": 1, "image_atol": 0.0, "results_dir": str(tmp_path)}
    params.write_text(yaml.safe_dump({"parity": strict, "reconstruct": config_to_dict(rc)}))
    assert parity.main(["--params", str(params), "--dataset", DATASET, "--pair", PAIR]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: runtime/reference parity failed beyond the tolerances") and "passed=False" in err[-1]
    assert not any("Traceback" in line for line in err)
    # the numbers of a failed run are written all the same
    assert json.loads((tmp_path / f"{DATASET}-{PAIR}.json").read_text())["passed"] is False
    # a prepared file without raw test trials: h5py's KeyError, which the stage's own except once missed
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    shutil.copy(root / "prepared" / f"{DATASET}.h5", prepared)
    with h5py.File(prepared / f"{DATASET}.h5", "a") as f:
        del f["raw_test/betas"]
    params.write_text(yaml.safe_dump({"parity": strict | {"prepared_dir": str(prepared)},
                                      "reconstruct": config_to_dict(rc)}))
    assert parity.main(["--params", str(params), "--dataset", DATASET, "--pair", PAIR]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "betas" in err[-1] and not any("Traceback" in line for line in err)


def test_other_generation_resolution_resizes_like_torch(setup):
    """resolution 24 px != native 16 px: decode -> numpy bicubic resize -> encode at 6x6 latents."""
    root, cfg, rc = setup
    ecfg, _ = make_configs(root)
    rc24 = dataclasses.replace(rc, resolution=24)
    bundle = export.run(dataclasses.replace(ecfg, out_dir=str(root / "b24")), rc24, DATASET, PAIR)
    assert json.loads((bundle / "manifest.json").read_text())["image_model"]["latent_shape"] == [4, 6, 6]
    m = parity.run(dataclasses.replace(cfg, bundles_dir=str(root / "b24"), items=2), rc24, DATASET, PAIR)
    assert m["latent_max_abs"] <= 1e-4 and m["image_max_abs"] <= 1e-2 and m["passed"]
    with pytest.raises(parity.ParityError, match="resolution"):
        parity.run(dataclasses.replace(cfg, bundles_dir=str(root / "b24")), rc, DATASET, PAIR)


def test_latent_criterion_is_allclose_like():
    from brainldm.export.parity import ParityConfig, passes

    base = {"pred_z_max_abs": 0.0, "pred_c_max_abs": 0.0, "image_max_abs": 0.0, "latent_max_abs": 2e-4}
    cfg = ParityConfig(latent_atol=1e-4, latent_rtol=1e-4)
    assert passes(dict(base, latent_tolerance_ratio=0.99), cfg)
    assert not passes(dict(base, latent_tolerance_ratio=1.01), cfg)


LATENT_ATOL = 1e-4
N_STEPS, LATENT_SHAPE = 4, (2, 4, 4, 4)


def _steps(seed: int = 0) -> list:
    """Reference step latents of a typical magnitude (~1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.standard_normal(LATENT_SHAPE).astype(np.float32) for _ in range(N_STEPS)]


def _passing_metrics(ratio: float) -> dict:
    return {"pred_z_max_abs": 0.0, "pred_c_max_abs": 0.0, "image_max_abs": 0.0, "latent_tolerance_ratio": ratio,
            "image_psnr_db": parity.PSNR_CAP_DB}


def test_one_step_element_beyond_tolerance_fails_the_verdict():
    """A single latent element off by 3x the tolerance fails, though the mean difference is ~1e-7."""
    cfg = parity.ParityConfig(latent_atol=LATENT_ATOL, latent_rtol=0.0)
    expected = _steps()
    got = [a.copy() for a in expected]
    got[2][1, 3, 0, 2] += 3 * LATENT_ATOL
    per_step, ratio = parity.step_differences(expected, got, cfg)
    assert per_step[2] > 2 * LATENT_ATOL and per_step[0] == per_step[1] == per_step[3] == 0.0
    assert ratio > 2.0
    assert not parity.passes(_passing_metrics(ratio), cfg)
    # the same inputs within the tolerance pass: the failure is the one element's
    got[2][1, 3, 0, 2] -= 2.5 * LATENT_ATOL
    assert parity.passes(_passing_metrics(parity.step_differences(expected, got, cfg)[1]), cfg)


def test_relative_tolerance_is_judged_per_element():
    """rtol scales each element's own reference: a small reference element gets no slack from a big one."""
    cfg = parity.ParityConfig(latent_atol=LATENT_ATOL, latent_rtol=1e-3)
    expected = _steps()
    expected[0][0, 0, 0, 0], expected[0][0, 0, 0, 1] = 100.0, 0.0  # one big element, one zero
    got = [a.copy() for a in expected]
    got[0][0, 0, 0, 0] += 50 * LATENT_ATOL  # within 1e-4 + 1e-3 * 100
    assert parity.step_differences(expected, got, cfg)[1] <= 1.0
    got[0][0, 0, 0, 1] += 2 * LATENT_ATOL  # only atol applies at a zero reference
    assert parity.step_differences(expected, got, cfg)[1] > 1.0


@pytest.mark.parametrize("key, value", [("pred_z_max_abs", 2e-4), ("pred_c_max_abs", 2e-4), ("image_max_abs", 0.02)])
def test_each_fp32_tolerance_can_fail_the_verdict(key, value):
    cfg = parity.ParityConfig(pred_atol=1e-4, image_atol=1e-2)
    assert parity.passes(_passing_metrics(0.5), cfg)
    assert not parity.passes(dict(_passing_metrics(0.5), **{key: value}), cfg)


def test_low_precision_fails_below_the_psnr_floor():
    cfg = parity.ParityConfig(fp16=True, psnr_min=30.0)
    assert parity.passes(dict(_passing_metrics(50.0), image_psnr_db=31.0), cfg)
    assert not parity.passes(dict(_passing_metrics(0.0), image_psnr_db=29.0), cfg)


def test_a_runtime_loop_off_in_one_element_fails_parity(setup, monkeypatch):
    """End to end: one element of one recorded runtime step moved by 3x the tolerance -> passed is False."""
    _, cfg, rc = setup
    real = parity.runtime_run

    def off_by_one_element(*args, **kwargs):
        images, steps = real(*args, **kwargs)
        steps[1] = steps[1].copy()
        steps[1].flat[5] += 3 * (cfg.latent_atol + cfg.latent_rtol * abs(steps[1].flat[5]))
        return images, steps

    monkeypatch.setattr(parity, "runtime_run", off_by_one_element)
    m = parity.run(dataclasses.replace(cfg, items=1, samples=1), rc, DATASET, PAIR)
    assert m["latent_tolerance_ratio"] > 2.0 and m["image_max_abs"] <= cfg.image_atol
    assert m["passed"] is False
