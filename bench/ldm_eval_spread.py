"""How much train_ldm's held-out metrics move with the held-out set: evaluate the versioned
small LDM on several held-out seeds at a given set size. Not a test: a diagnostic whose numbers
chose ``train_ldm.eval.n_images`` = 256 (with 64 images, img2img PixCorr ranged 0.584-0.672
over five seeds).

    python bench/ldm_eval_spread.py --n-images 64 --seeds 20240 20241 20242 20243 20244

With a seed that is not ``train_ldm.eval.seed`` it is a validation set: f = 2 latents were
chosen over f = 4 on ``--n-images 128 --seeds 31337`` (bench/results/ldm_f4_vs_f2.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from brainldm.runtime.atomic import write_text_atomic
from brainldm.train.ldm import held_out as E
from brainldm.train.ldm import train_ldm as T
from brainldm.train.config import load_config

KEYS = ("img2img_pixcorr", "img2img_colour_acc", "swapped_pixcorr", "swapped_colour_acc", "vae_pixcorr")


def spread(n_images: int, seeds: list[int], params: str) -> dict:
    """Metrics per held-out seed, then mean and sd over seeds for each metric in KEYS."""
    cfg = load_config(T.TrainLdmConfig, "train_ldm", params)
    per_seed = {}
    for seed in seeds:
        eval_cfg = dataclasses.replace(cfg.eval, seed=seed, n_images=n_images)
        metrics = E.evaluate(dataclasses.replace(cfg, eval=eval_cfg))
        per_seed[str(seed)] = {k: metrics[k] for k in KEYS}
        print(seed, {k: round(v, 4) for k, v in per_seed[str(seed)].items()}, flush=True)
    # One seed has no spread: sd is null rather than NaN (which is not JSON).
    summary = {k: {"mean": float(np.mean([m[k] for m in per_seed.values()])),
                   "sd": float(np.std([m[k] for m in per_seed.values()], ddof=1)) if len(seeds) > 1 else None}
               for k in KEYS}
    return {"model": cfg.out, "n_images": n_images, "per_seed": per_seed, "over_seeds": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[20240, 20241, 20242, 20243, 20244])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ldm_eval_spread.json"))
    args = parser.parse_args()
    result = spread(args.n_images, args.seeds, args.params)
    write_text_atomic(args.out, json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps(result["over_seeds"], indent=1))


if __name__ == "__main__":
    main()
