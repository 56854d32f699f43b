"""Stage `report`: REPORT.md from the pipeline's metrics files.

Two tables in the shape of the original course project's: Table 3 (feature-decoding
MSE per decoder x dataset) and Table 4 (reconstruction metrics per method x dataset),
each with the protocol stated and the original project's numbers quoted beside ours,
clearly labelled as theirs on real data.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from brainldm.runtime.atomic import write_text_atomic
from brainldm.train.config import load_config, run_stage

# The original project's numbers: real NSD / THINGS-fMRI, SD v1.4, their protocol (docs/data-formats.md).
THEIR_MSE = {
    ("c", "ridge"): (0.728, 1.144), ("c", "cnn"): (0.266, 0.794),
    ("z", "ridge"): (0.754, 0.743), ("z", "cnn"): (0.558, 0.692),
    ("z", "vae"): (0.567, 0.726), ("z", "gcn"): (0.554, 0.687),
}
ROW_LABELS = {"ceiling": "ceiling: true z + true c"}
FLOOR_LABELS = {"shuffled_stimuli": "another test stimulus", "mean_train_image": "mean training image"}
THEIR_RECONSTRUCTION = {"ours": {"PCC": 0.325, "SSIM": 0.353}, "baseline": {"PCC": 0.266, "SSIM": 0.214}}
STAGE1_COLUMNS = ("mse", "pearson_sample", "pearson_dim", "identification")


@dataclass(frozen=True)
class ReportConfig:
    """Params section `report`."""

    datasets: tuple[str, ...] = ("sim-nsd", "sim-things")
    decoders: tuple[str, ...] = ()
    pairs: tuple[str, ...] = ("ceiling", "baseline", "ours")
    decode_dir: str = "results/decode"
    evaluate_dir: str = "results/evaluate"
    parity_dir: str = "results/parity"  # runtime-vs-reference parity JSONs; "" = leave the section out
    known_truth_dir: str = "results/known_truth"  # simulated subjects' known truth; "" = leave Table 5 out
    out: str = "REPORT.md"
    extra_notes: tuple[str, ...] = field(default_factory=tuple)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"report: missing metrics file {path}; run the stage that writes it first")
    return json.loads(path.read_text(encoding="utf-8"))


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def stage1_table(cfg: ReportConfig) -> list[str]:
    """Table 3: one row per decoder, MSE and correlations per dataset, theirs beside; then per
    target its ceiling (a perfect predictor of the target as defined) and floor (the training mean)."""
    header = ["decoder", "target", "kind"] + [f"{d} {m}" for d in cfg.datasets for m in ("MSE", "r/dim", "ident.")]
    header += ["theirs NSD MSE", "theirs THINGS MSE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_target: dict[str, dict[str, dict]] = {}
    for decoder in cfg.decoders:
        cells, kind, target = [], "", ""
        for dataset in cfg.datasets:
            m = _read_json(Path(cfg.decode_dir) / dataset / f"{decoder}.json")
            kind, target = m["kind"], m["target"]
            by_target.setdefault(target, {}).setdefault(dataset, m)
            cells += [_fmt(m["mse"]), _fmt(m["pearson_dim"]), f"{m['identification']:.1%}"]
        theirs = THEIR_MSE.get((target, kind)) if decoder.count("-") == 1 else None  # ablations: none
        theirs_cells = [_fmt(t) for t in theirs] if theirs else ["–", "–"]
        lines.append("| " + " | ".join([decoder, target, kind] + cells + theirs_cells) + " |")
    for target, per_dataset in by_target.items():
        for label, key in (("ceiling: perfect predictor", "ceiling"), ("floor: training mean", "floor")):
            cells = []
            for dataset in cfg.datasets:
                ref = per_dataset[dataset].get(key)
                if ref is None:
                    raise ValueError(f"{cfg.decode_dir}/{dataset}: decode metrics without '{key}'; rerun decode")
                ident = ref.get("identification")
                cells += [_fmt(ref.get("mse")), _fmt(ref.get("pearson_dim")), "–" if ident is None else f"{ident:.1%}"]
            lines.append("| " + " | ".join([label, target, "–"] + cells + ["–", "–"]) + " |")
    return lines


def target_definition(cfg: ReportConfig) -> str:
    """The z target as the targets stage defined it (targets.latent), read from the decode metrics."""
    dataset = cfg.datasets[0]
    latents = {_read_json(Path(cfg.decode_dir) / dataset / f"{d}.json").get("z_latent") for d in cfg.decoders}
    latent = ", ".join(sorted(str(x) for x in latents))
    return (f"z is the VAE posterior {latent} x scaling factor (`targets.latent: {latent}`); c is the text "
            "encoder's states. The ceiling rows score a perfect predictor of the target as defined (the posterior "
            "mean for z); the floor rows predict every test image by the mean target of the training images.")


def _metric_cell(summary: dict) -> str:
    if not isinstance(summary, dict) or summary.get("mean") is None:
        return "–"
    text = f"{summary['mean']:.3f}"
    if summary.get("ci_low") is not None:
        text += f" [{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]"
    return text


def _table4_rows(result: dict, pairs: tuple[str, ...], where: str) -> list[tuple[str, dict]]:
    """(label, metric -> summary) per row of one dataset: its pairs, then the floors, then the paired differences."""
    rows = []
    for pair in pairs:
        if pair not in result["pairs"]:
            raise ValueError(f"{where} has no pair '{pair}'")
        rows.append((ROW_LABELS.get(pair, pair), result["pairs"][pair]))
    rows += [(f"floor: {FLOOR_LABELS.get(name, name)}", summary) for name, summary in result.get("floors", {}).items()]
    rows += [(f"{name.replace('-', ' − ')} (paired)", summary) for name, summary in result.get("differences", {}).items()]
    return rows


def reconstruction_table(cfg: ReportConfig) -> tuple[list[str], list[str]]:
    """Table 4: rows = (dataset, pair | floor | paired difference); columns = every summarised metric. Also protocol lines."""
    results = {d: _read_json(Path(cfg.evaluate_dir) / d / "metrics.json") for d in cfg.datasets}
    metric_names = sorted({m for r in results.values() for p in r["pairs"].values() for m in p})
    lines = ["| dataset | method | " + " | ".join(metric_names) + " |", "|" + "---|" * (len(metric_names) + 2)]
    protocol = []
    for dataset, result in results.items():
        for label, summary in _table4_rows(result, cfg.pairs, f"{cfg.evaluate_dir}/{dataset}/metrics.json"):
            lines.append(f"| {dataset} | {label} | " + " | ".join(_metric_cell(summary.get(m)) for m in metric_names) + " |")
        protocol.append(f"- **{dataset}**: " + "; ".join(f"{k}: {v}" for k, v in sorted(result.get("protocol", {}).items())
                                                        if not isinstance(v, (dict, list))))
    return lines, protocol


def _held(value: float, bound: float) -> str:
    return "yes" if value <= bound else "NO"


def parity_table(folder: Path) -> list[str]:
    """One row per parity JSON: backend and whether each tolerance held. The differences themselves
    stay in the JSONs: ONNX Runtime's kernels depend on the processor, and this report must not."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"report: no parity results in {folder}; run the parity stage first")
    tol = _read_json(files[0]).get("tolerances", {})
    lines = [f"| bundle | backend | z, c predictions within {tol.get('pred')} | latents after every step within "
             f"{tol.get('latent')} + {tol.get('latent_rtol', 0)} x \\|ref\\| | images within {tol.get('image')} | "
             "passed |", "|---|---|---|---|---|---|"]
    for path in files:
        m = _read_json(path)
        pred = max(m["pred_z_max_abs"], m["pred_c_max_abs"])
        lines.append(f"| {path.stem} | {m['backend']} | {_held(pred, tol.get('pred', 0.0))} | "
                     f"{_held(m.get('latent_tolerance_ratio', float('inf')), 1.0)} | "
                     f"{_held(m['image_max_abs'], tol.get('image', 0.0))} | {'yes' if m['passed'] else 'NO'} |")
    lines += ["", f"Step latents: the runtime's denoising loop from the reference's init latents; images end to "
                  f"end. The measured differences, and the VAE round trip before the loop (decode z, encode; "
                  f"each side its own), are in `{folder}/*.json`."]
    return lines


def noise_ceiling_table(truths: dict[str, dict]) -> list[str]:
    """Table 5a: per dataset and ROI, the known noise ceiling of the test average beside the data's estimate."""
    lines = ["| dataset | ROI | voxels | test repeats | known NC, median (%) | estimated from the data, mean (%) |",
             "|---|---|---|---|---|---|"]
    for dataset, truth in truths.items():
        ceiling = truth["noise_ceiling"]
        for roi, values in ceiling["rois"].items():
            lines.append(f"| {dataset} | {roi} | {values['n_voxels']} | {ceiling['n_repeats']:g} | "
                         f"{values['median']:.1f} | {values['data_mean']:.1f} |")
    return lines


def attainable_table(truths: dict[str, dict], decoders: tuple[str, ...]) -> list[str]:
    """Table 5b: the oracle (ridge on the noise-free voxels) per target, then each decoder's share of it."""
    header = ["decoder", "target"] + [f"{d} {m}" for d in truths for m in ("r/dim", "ident.")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = next(iter(truths.values()))
    for target in sorted(first["oracle"]):
        cells = [f"{t['oracle'][target]['pearson_dim']:.3f} | {t['oracle'][target]['identification']:.1%}"
                 for t in truths.values()]
        lines.append(f"| oracle: {first['oracle'][target]['decoder']} on noise-free voxels | {target} | "
                     + " | ".join(cells) + " |")
    for decoder in decoders:
        shares = [t["shares"][decoder] for t in truths.values()]
        cells = [f"{sh['pearson_dim']:.0%} | {sh['identification']:.0%}" for sh in shares]
        lines.append(f"| {decoder}, share of the oracle | {shares[0]['target']} | " + " | ".join(cells) + " |")
    return lines


def known_truth_section(cfg: ReportConfig) -> list[str]:
    """Table 5, from the known_truth stage: what only a simulated subject can tell."""
    truths = {d: _read_json(Path(cfg.known_truth_dir) / f"{d}.json") for d in cfg.datasets}
    return [
        "## Table 5: the simulation's known truth (simulated subjects only)", "",
        "The simulation knows each voxel's signal and noise, so its noise ceiling need not be estimated (5a),",
        "and a decoder can be fitted to the noise-free voxels: ridge with the same ROIs, alphas and training",
        "images, the best a linear readout of this brain can do. 5b gives that oracle's test scores, then each",
        "decoder's score as a share of them (above 100%: the decoder beats a noise-free linear readout).", "",
        *noise_ceiling_table(truths), "", *attainable_table(truths, cfg.decoders),
    ]


def theirs_lines() -> list[str]:
    lines = ["| method (theirs, real NSD subj01, SD v1.4) | PCC | SSIM |", "|---|---|---|"]
    for method, values in THEIR_RECONSTRUCTION.items():
        name = "GCN z + CNN c" if method == "ours" else "linear (Takagi)"
        lines.append(f"| {name} | {values['PCC']:.3f} | {values['SSIM']:.3f} |")
    return lines


def build_report(cfg: ReportConfig) -> str:
    """The whole REPORT.md text."""
    reconstruction, protocol = reconstruction_table(cfg)
    parts = [
        "# brainldm report",
        "",
        "Generated by the `report` stage from the pipeline's metrics files; do not edit by hand.",
        "Default run: the simulated subject (sim-nsd, sim-things) and the project's small LDM.",
        "",
        "## Table 3: feature decoding on the test split (repeats averaged)",
        "",
        "MSE in target units (z: scaled VAE latents; c: text-encoder states), r/dim = mean per-dimension",
        "Pearson r across test images, ident. = two-way identification in the target space (chance 50%).",
        "The last two columns are the original course project's MSE on real NSD / THINGS-fMRI with",
        "SD v1.4 targets: **theirs, different data and units, quoted for context only**.",
        target_definition(cfg),
        "",
        *stage1_table(cfg),
        "",
        "## Table 4: reconstruction (mean over test images, [95% bootstrap CI])",
        "",
        "Read each metric between its ceiling (the test images' true targets through the same generator, noise",
        "and samples) and its floors (a perfect picture of another test image; the mean training image): a",
        "method is only as good as its position in that range. The paired rows are per-image differences with",
        "a bootstrap over test images; a CI that excludes 0 is a difference this test set can show.",
        "",
        *reconstruction,
        "",
        "Protocol:",
        *protocol,
        "",
        "For context, the original project's reported numbers (**theirs**, real NSD, 5 samples, 512 px, PCC on",
        "RGB in [-1, 1]; not comparable with the simulated subject):",
        "",
        *theirs_lines(),
    ]
    if cfg.known_truth_dir:
        parts += ["", *known_truth_section(cfg)]
    if cfg.parity_dir:
        parts += ["", "## Runtime parity (lean runtime vs the diffusers reference, same inputs and noise)", "",
                  *parity_table(Path(cfg.parity_dir))]
    parts += ["", *cfg.extra_notes]
    return "\n".join(parts).rstrip() + "\n"


def run(cfg: ReportConfig) -> Path:
    """Write REPORT.md (``cfg.out``) atomically; returns its path."""
    write_text_atomic(cfg.out, build_report(cfg))
    return Path(cfg.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    return run_stage(lambda: f"wrote {run(load_config(ReportConfig, 'report', args.params))}")


if __name__ == "__main__":
    sys.exit(main())
