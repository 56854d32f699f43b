"""Benchmark: brainldm ridge (train/decoding/ridge.py) vs himalaya RidgeCV on NSD-shaped random data.

Both fits see the same float32 data (a planted linear signal plus noise, voxels with
offsets and scales, targets with offsets), the same alpha grid, the same 5 contiguous
folds, voxels standardised with the training statistics and an intercept fitted per fold
(himalaya ``fit_intercept=True``), so their alpha choices and predictions are comparable.
Each fit runs in its own subprocess (peak RSS from ``getrusage``) with the chosen thread
count; predictions on held-out test trials are compared.

    python bench/bench_ridge.py --scale 0.2 --threads 2
    python bench/bench_ridge.py --scale 1.0   # the full NSD shape (~1 h on 2 cores)

Writes bench/results/ridge.json (one entry per scale, merged with earlier runs).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL_SHAPE = {"n_train": 24_980, "n_voxels": 10_631, "n_targets": 6_400}
N_TEST_FULL = 1_000
SIGNAL_RANK = 64  # the planted weights are low-rank only so the data is cheap to generate
ALPHA_GRID_REL = (-2.0, 2.0)  # alphas = n_train * logspace(-2, 2, 7): eigenvalues of X_s^T X_s ~ n
N_ALPHAS = 7
N_FOLDS = 5
TARGET_BATCH = 1_000
SNR_RANGE = (0.05, 5.0)  # per-target signal/noise variance, log-uniform: spreads the alphas
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ridge.json"


def shape_for(scale: float) -> dict:
    shape = {k: max(8, round(v * scale)) for k, v in FULL_SHAPE.items()}
    shape["n_test"] = max(8, round(N_TEST_FULL * scale))
    return shape


def make_data(shape: dict, seed: int, folder: Path) -> None:
    """Write X (n, V), Y (n, K), X_test, Y_test float32 .npy files into ``folder``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n, n_test, V, K = shape["n_train"], shape["n_test"], shape["n_voxels"], shape["n_targets"]
    offset = rng.uniform(-1, 1, V).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, V).astype(np.float32)
    w_in = (rng.standard_normal((V, SIGNAL_RANK)) / np.sqrt(V)).astype(np.float32)
    w_out = rng.standard_normal((SIGNAL_RANK, K)) / np.sqrt(SIGNAL_RANK)
    w_out *= np.sqrt(np.exp(rng.uniform(*np.log(SNR_RANGE), K)))
    y_offset = rng.uniform(-3, 3, K).astype(np.float32)
    for name, rows in (("", n), ("_test", n_test)):
        Z = rng.standard_normal((rows, V), dtype=np.float32)
        Y = (Z @ w_in) @ w_out.astype(np.float32) + rng.standard_normal((rows, K), dtype=np.float32)
        np.save(folder / f"X{name}.npy", Z * scale + offset)
        np.save(folder / f"Y{name}.npy", Y + y_offset)


def run_child(which: str, folder: Path, alphas: list[float], threads: int) -> dict:
    """Fit one implementation in a fresh process; returns its timings and peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--child", which, "--data", str(folder),
           "--alphas", json.dumps(alphas)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(which: str, folder: Path, alphas: list[float]) -> None:
    import numpy as np

    X, Y = np.load(folder / "X.npy"), np.load(folder / "Y.npy")
    X_test = np.load(folder / "X_test.npy")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    predict, chosen = (_fit_ours if which == "ours" else _fit_himalaya)(X, Y, np.asarray(alphas))
    fit_s, fit_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    np.save(folder / f"pred_{which}.npy", predict(X_test))
    np.save(folder / f"alpha_{which}.npy", chosen)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # CPU seconds (all threads) beside wall time: less sensitive to other load on the machine.
    print(json.dumps({"fit_s": fit_s, "fit_cpu_s": fit_cpu_s, "load_avg_1min": os.getloadavg()[0],
                      "peak_rss_gb": rss_peak / 2**20,
                      "rss_after_load_gb": rss_loaded / 2**20}))


def _fit_ours(X, Y, alphas):
    from brainldm.train.decoding import ridge

    model = ridge.fit_ridge_cv(X, Y, alphas, n_folds=N_FOLDS, target_chunk=TARGET_BATCH, progress=False)
    return model.predict, model.alpha_per_target


def _fit_himalaya(X, Y, alphas):
    import numpy as np
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV

    from brainldm.train.decoding import ridge

    set_backend("numpy", on_error="raise")
    mean, std = ridge._column_stats(X)  # the same standardisation as ours, inside the timing
    model = RidgeCV(alphas=alphas.astype(np.float32), cv=N_FOLDS, fit_intercept=True,
                    solver_params=dict(n_targets_batch=TARGET_BATCH, n_targets_batch_refit=TARGET_BATCH))
    model.fit(ridge._standardise(X, mean, std), Y)
    return (lambda Xt: np.asarray(model.predict((Xt - mean) / std), dtype=np.float32),
            np.asarray(model.best_alphas_, dtype=np.float32))


def compare(folder: Path, alphas: list[float]) -> dict:
    import numpy as np

    ours, theirs = np.load(folder / "pred_ours.npy"), np.load(folder / "pred_himalaya.npy")
    a_ours, a_theirs = np.load(folder / "alpha_ours.npy"), np.load(folder / "alpha_himalaya.npy")
    same = np.isclose(a_ours, a_theirs, rtol=1e-4)
    diff = np.abs(ours.astype(np.float64) - theirs)
    y_test = np.load(folder / "Y_test.npy")
    return {
        "max_abs_pred_diff": float(diff.max()),
        "max_abs_pred_diff_same_alpha": float(diff[:, same].max()) if same.any() else None,
        "pred_scale_max_abs": float(np.abs(theirs).max()),
        "alpha_agreement": float(same.mean()),
        "alpha_hist_ours": {str(a): int(np.isclose(a_ours, a, rtol=1e-4).sum()) for a in alphas},
        "test_r2_mean_ours": float(1 - ((y_test - ours) ** 2).sum(0).mean()
                                   / ((y_test - y_test.mean(0)) ** 2).sum(0).mean()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.2, help="fraction of the NSD shape per axis")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-himalaya", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", choices=["ours", "himalaya"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--alphas", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.data, json.loads(args.alphas))
        return 0
    if not 0 < args.scale <= 1 or args.threads < 1:
        print("error: --scale must be in (0, 1] and --threads >= 1", file=sys.stderr)
        return 2
    return run_benchmark(args)


def run_benchmark(args) -> int:
    import numpy as np

    shape = shape_for(args.scale)
    alphas = (shape["n_train"] * np.logspace(*ALPHA_GRID_REL, N_ALPHAS)).tolist()
    record = {"shape": shape, "alphas": alphas, "n_folds": N_FOLDS, "threads": args.threads,
              "n_targets_batch": TARGET_BATCH, "seed": args.seed,
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench_ridge_") as tmp:
        folder = Path(tmp)
        make_data(shape, args.seed, folder)
        print(f"shape {shape}, alphas {np.round(alphas, 3).tolist()}", flush=True)
        record["ours"] = run_child("ours", folder, alphas, args.threads)
        print(f"ours:     {record['ours']}", flush=True)
        if not args.skip_himalaya:
            record["himalaya"] = run_child("himalaya", folder, alphas, args.threads)
            print(f"himalaya: {record['himalaya']}", flush=True)
            record["speedup"] = record["himalaya"]["fit_s"] / record["ours"]["fit_s"]
            record["cpu_time_ratio"] = record["himalaya"]["fit_cpu_s"] / record["ours"]["fit_cpu_s"]
            record.update(compare(folder, alphas))
    print(json.dumps({k: v for k, v in record.items() if k not in ("shape", "alphas")}, indent=1))
    _merge_results(args.out, f"scale_{args.scale:g}_threads_{args.threads}", record)
    return 0


def _merge_results(path: Path, key: str, record: dict) -> None:
    from brainldm.runtime.atomic import write_text_atomic

    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = record
    write_text_atomic(path, json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
