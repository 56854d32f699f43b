"""The control study's table (controls.md) and plot (controls.png) from its result dict (run.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from brainldm.runtime.atomic import atomic_path

LATENT_COLUMNS = (("threshold", "threshold"), ("noise corr", "noise_corr"), ("low-SNR share", "low_snr_fraction"))


def table(conditions: dict, decoders: list[str], baseline: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    """Markdown: one row per condition, per decoder r/dim and the paired difference to the baseline;
    ``extra``: (header, settings key) columns after the gain."""
    others = [d for d in decoders if d != baseline]
    head = ["condition", "gain", *(h for h, _ in extra), "train trials", f"{baseline} r/dim"]
    head += [f"{d} r/dim" for d in others] + [f"{d} − {baseline} (per-image r, CI)" for d in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in conditions.items():
        rows = entry["decoders"]
        cells = [name, f"{entry['settings']['nonlinearity_gain']:g}", *(f"{entry['settings'][k]:g}" for _, k in extra),
                 f"{entry['n_train_trials']:,}", f"{rows[baseline]['r_per_dim']:.3f}"]
        cells += [f"{rows[d]['r_per_dim']:.3f}" for d in others]
        for d in others:
            diff = rows[d]["minus_baseline"]
            mark = " **wins**" if rows[d]["beats_baseline"] else (" loses" if rows[d]["loses_to_baseline"] else "")
            cells.append(f"{diff['mean']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(result: dict) -> str:
    """controls.md: the scene subject's table, then the latent subject's."""
    parts = [f"## Scene subject ({result['dataset']}, z = VAE posterior {result['target_latent']})\n",
             table(result["conditions"], result["decoders"], result["baseline"])]
    if result["latent"]["conditions"]:
        parts += ["\n## Latent-Gaussian subject (latent.py: ridge is optimal for a linear brain)\n",
                  table(result["latent"]["conditions"], result["latent"]["decoders"], result["baseline"],
                        LATENT_COLUMNS)]
    return "\n".join(parts)


def _plain(entry: dict) -> bool:
    """A condition on the gain x size grid (the latent family's noise variants are in the table only)."""
    return entry["settings"].get("noise_corr", 0) == 0 and entry["settings"].get("low_snr_fraction", 0) == 0


def _panels(axes, conditions: dict, decoders: list[str], baseline: str, family: str, colors: dict) -> None:
    sizes = sorted({e["n_train_trials"] for e in conditions.values()})
    others = [d for d in decoders if d != baseline]
    for ax, size in zip(axes, sizes):
        entries = sorted((e for e in conditions.values() if e["n_train_trials"] == size and _plain(e)),
                         key=lambda e: e["settings"]["nonlinearity_gain"])
        gains = np.array([e["settings"]["nonlinearity_gain"] for e in entries])
        for k, d in enumerate(others):
            diffs = [e["decoders"][d]["minus_baseline"] for e in entries]
            mean = np.array([x["mean"] for x in diffs])
            err = np.array([[x["mean"] - x["ci_low"] for x in diffs], [x["ci_high"] - x["mean"] for x in diffs]])
            ax.errorbar(gains * (1 + 0.03 * (k - 1)), mean, yerr=err, marker="o", capsize=3, label=d, color=colors[d])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("encoding nonlinearity gain")
        ax.set_title(f"{family}: {size:,} training trials", fontsize=10)
        ax.legend(fontsize=8)


def plot(result: dict, path: Path) -> None:
    """Per-image r minus the baseline's, with CIs, against the nonlinearity gain: one row per
    subject family, one panel per training size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [("scene subject", result["conditions"], result["decoders"])]
    if result["latent"]["conditions"]:
        families.append(("latent subject", result["latent"]["conditions"], result["latent"]["decoders"]))
    width = max(len({e["n_train_trials"] for e in c.values()}) for _, c, _ in families)
    fig, axes = plt.subplots(len(families), width, figsize=(4.5 * width, 3.6 * len(families)), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(d for _, _, decoders in families for d in decoders if d != result["baseline"]))
    colors = {d: cycle[k % len(cycle)] for k, d in enumerate(names)}  # one colour per decoder in every panel
    for row, (family, conditions, decoders) in zip(axes, families):
        _panels(row, conditions, decoders, result["baseline"], family, colors)
        row[0].set_ylabel(f"per-image r − {result['baseline']} ({result['ci_level']:.0%} CI)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
