"""report.md / report.html of a simulated study: tables, figures and the resolved configuration.

Everything is drawn from metrics.json and the federation reports, i.e. from aggregates: ROC
curves and the calibration plot come from the 16-bin logit histograms the sites returned, the
Dice distribution from each centre's five-number summary. The synthetic-ROI grids are the
sites' own audit images, which in a simulation sit in the run folder on this machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402

from common.baselines import BASELINE_ARMS  # noqa: E402
from common.federation import binned  # noqa: E402
from common.synthesis.audit import REALISM_RULE  # noqa: E402

CENTRES = (binned.EDGES[:-1] + binned.EDGES[1:]) / 2


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(entry: dict) -> str:
    ci = entry.get("auc_ci")
    return f"{_f(entry.get('auc'))} [{_f(ci[0])}–{_f(ci[1])}]" if ci else _f(entry.get("auc"))


def _p(comparison: dict | None) -> str:
    if not comparison:
        return "–"
    return f"{comparison['diff']:+.3f} (p={comparison['p']:.3f})"


def histograms(report: dict, arm: str, center: str) -> tuple[np.ndarray, np.ndarray]:
    """The arm's per-class logit histograms at a centre; empty where the fold has no such arm
    (leave-one-out: local-<c> does not exist in the fold that holds c out)."""
    record = report["stages"]["cls"]["arms"].get(arm, {})
    return binned.from_metrics([record.get("external", {}).get(center, {})])


def fold_of(folds: list[dict], center: str) -> dict:
    return next(r for r in folds if center in str(r["settings"]["test-centers"]).split(","))


def _save(fig, path: Path) -> str:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


def plot_roc(metrics: dict, folds: list[dict], out: Path) -> str:
    centers = metrics["test_centers"]
    fig, axes = plt.subplots(1, len(centers), figsize=(4.2 * len(centers), 4), squeeze=False)
    for ax, center in zip(axes[0], centers):
        report = fold_of(folds, center)
        for arm in metrics["arms"]:
            he, nhe = histograms(report, arm, center)
            if he.sum() == 0 or nhe.sum() == 0:
                continue
            # Positive call: logit in this bin or above; sweep from the top bin down.
            tpr = np.concatenate([[0], np.cumsum(he[::-1]) / he.sum()])
            fpr = np.concatenate([[0], np.cumsum(nhe[::-1]) / nhe.sum()])
            auc = metrics["arms"][arm]["centers"].get(center, {}).get("auc")
            ax.plot(fpr, tpr, marker=".", label=f"{arm} ({_f(auc)})", lw=2 if arm == "federated" else 1)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set(title=f"{center} (external)", xlabel="1 - specificity", ylabel="sensitivity", aspect="equal")
        if ax.get_legend_handles_labels()[0]:  # a centre without both classes has no curve
            ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out / "roc_external.png")


def plot_calibration(metrics: dict, folds: list[dict], out: Path) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for arm, slot in metrics["arms"].items():
        he, nhe = np.zeros(binned.N_BINS), np.zeros(binned.N_BINS)
        predicted = np.zeros(binned.N_BINS)
        for center in metrics["test_centers"]:
            report = fold_of(folds, center)
            if arm not in report["stages"]["cls"]["arms"]:
                continue
            point = report["stages"]["cls"]["arms"][arm]["operating_point"]
            h, n = histograms(report, arm, center)
            prob = 1 / (1 + np.exp(-(point["calib-a"] * CENTRES + point["calib-b"])))
            he, nhe, predicted = he + h, nhe + n, predicted + prob * (h + n)
        total = he + nhe
        keep = total > 0
        if keep.any():
            ax.plot(predicted[keep] / total[keep], he[keep] / total[keep], marker="o", label=arm,
                    lw=2 if arm == "federated" else 1)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set(title="calibration, pooled external centres", xlabel="predicted HE probability",
           ylabel="observed HE fraction", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    return _save(fig, out / "calibration_external.png")


def plot_dice(folds: list[dict], out: Path) -> str:
    stats = []
    for report in folds:
        for center, m in report["stages"].get("seg", {}).get("final", {}).items():
            if "dice-median" in m:
                role = report["centers"].get(center, {}).get("role", "")
                stats.append({"label": f"{center}\n({'external' if role == 'test' else 'val'})",
                              "whislo": m["dice-min"], "q1": m["dice-q25"], "med": m["dice-median"],
                              "q3": m["dice-q75"], "whishi": m["dice-max"], "mean": m["dice"]})
    fig, ax = plt.subplots(figsize=(1.2 * max(len(stats), 3) + 1, 3.8))
    if stats:
        ax.bxp(stats, showmeans=True, showfliers=False)
    ax.set(title="segmentation Dice per centre (federated model; min-q1-median-q3-max)", ylabel="Dice", ylim=(0, 1))
    return _save(fig, out / "dice.png")


def plot_learning(folds: list[dict], out: Path) -> str:
    panels = (("seg", "train", "train-loss"), ("seg", "evaluate", "dice"),
              ("cls", "train", "train-loss"), ("cls", "evaluate", "auc"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (stage, kind, key) in zip(axes, panels):
        for fold_index, report in enumerate(folds):
            stages = [s for s in report["stages"] if s == stage or s.startswith(f"{stage}-")]
            for name in stages:
                rounds = report["stages"][name].get("rounds", [])
                for center in report["centers"]:
                    xs = [r["round"] for r in rounds if key in r.get(kind, {}).get("metrics", {}).get(center, {})]
                    ys = [r[kind]["metrics"][center][key] for r in rounds
                          if key in r.get(kind, {}).get("metrics", {}).get(center, {})]
                    if xs:
                        suffix = f" fold{fold_index + 1}" if len(folds) > 1 else ""
                        ax.plot(xs, ys, marker="o", label=f"{name} {center}{suffix}", ls="-" if name == stage else ":")
        ax.set(title=f"{stage}: {kind} {key} per round", xlabel="round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=6)
    return _save(fig, out / "learning_curves.png")


def synthetic_grids(folds: list[dict], out: Path) -> list[tuple[str, str]]:
    """(centre, relative path) of each site's synthetic-ROI audit grid (site-private files)."""
    grids = []
    for report in folds:
        federation = Path(report["settings"]["out-dir"])
        for center in report.get("stages", {}).get("synth", {}):
            path = federation / "sites" / center / "quality.png"
            if path.is_file():
                grids.append((center, os.path.relpath(path, out)))
    return grids


def build_markdown(metrics: dict, folds: list[dict], figures: dict, elapsed_s: float) -> str:
    arms = metrics["arms"]
    fed = arms["federated"]["pooled"]
    lines = ["# hemex simulated multicentre study", ""]
    cohort = metrics["cohort"] or metrics["data_root"]
    lines += [f"Cohort: **{cohort}**, seed {metrics['seed']}; "
              + "; ".join(f"fold {i + 1}: trained on {', '.join(f['train'])}, tested on {', '.join(f['test'])}"
                          for i, f in enumerate(metrics["folds"]))
              + f". Wall time {elapsed_s / 60:.1f} min.", ""]
    cut_by_model = folds[0].get("settings", {}).get("cls-masks") == "segmentation"
    lines += ["Every classifier arm is scored on ROIs cut with the **same federated segmentation model** "
              "(the segmentation stage is shared; its mask is mapped onto each scan's own pixels and its boundary "
              "redrawn there, as `hemex predict` does); arms differ only in how the HE classifier was trained. "
              "Segmentation columns: Dice and volume MAE of the model on its working grid, and of the delivered "
              "(refined) mask on the scan's grid against the stored mask. "
              + ("Every arm is also trained and calibrated on ROIs cut by that model at the training sites, as "
                 "at inference (`cls-masks = segmentation`; the auxiliary marker targets come from the reference "
                 "masks). " if cut_by_model else "Arms are trained on ROIs cut on the reference masks "
                                                 "(`cls-masks = reference`). ")
              + "Where the profile fuses the NCCT markers into the classifier (`marker_fusion`, on in every "
              "built-in profile), they are measured on that segmentation too, so its errors reach both inputs. "
              "Held-out centres never trained any model.", ""]
    if any(arm in arms for arm in BASELINE_ARMS):
        lines += ["The `volume-only` and `markers-only` arms are logistic regressions on the NCCT markers of the same "
                  "masks (at the training sites those the classifier trains on; at the held-out centres the delivered "
                  "masks the other arms are scored on), fitted over the training centres from per-site sums (feature "
                  "moments, then Newton steps on summed gradients and Hessians: the pooled fit, no marker leaves a "
                  "site). They show what the images add: a classifier arm below them has learned less than the "
                  "markers alone carry.", ""]
    for i, report in enumerate(folds):
        failed = report.get("stages", {}).get("baselines", {}).get("failed")
        if failed:  # the study went on without them: say why they are missing
            lines += [f"Fold {i + 1}: the baseline arms were not fitted: {failed}", ""]
    lines += ["## Arms", "", "| arm | what it is |", "|---|---|"]
    lines += [f"| {arm} | {slot['description']} |" for arm, slot in arms.items()]
    lines += ["", "## Pooled external result", "",
              "Pooled = fixed-effect (inverse-variance) combination of the per-centre AUCs and of the per-centre "
              "paired DeLong differences (sites return aggregates only). Sensitivity and specificity at each arm's "
              "operating point, fixed on training-centre validation cases.", "",
              "| arm | n (HE) | AUC [95% CI] | / oracle | vs federated (p) | sens | spec | Brier |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, slot in arms.items():
        p = slot["pooled"]
        ratio = _f(p["auc"] / p["oracle_auc"], 2) if p.get("auc") and p.get("oracle_auc") else "–"
        lines.append(f"| {arm} | {p['n']} ({p['n_he']}) | {_ci(p)} | {ratio} | {_p(p.get('vs_federated'))} | "
                     f"{_f(p['sensitivity'], 2)} | {_f(p['specificity'], 2)} | {_f(p['brier'])} |")
    if fed.get("oracle_auc"):
        lines += ["", f"Oracle AUC (true generator risk) on the same cases: {_f(fed['oracle_auc'])}; "
                      f"federated / oracle = {_f(fed['auc'] / fed['oracle_auc'], 2) if fed['auc'] else '–'} "
                      f"(target >= 0.90)."]
    lines += ["", "## Per external centre", "",
              "| centre | arm | n (HE) | AUC [95% CI, DeLong] | oracle | vs federated (p) | sens | spec | Brier | "
              "Dice | volume MAE mL | Dice, scan grid | volume MAE mL, scan grid | |volume error| median mL, scan grid "
              "| Dice < 5 mL (n), scan grid |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for center in metrics["test_centers"]:
        for arm, slot in arms.items():
            if center not in slot["centers"]:  # leave-one-out: local-<c> is never scored at c
                continue
            e = slot["centers"][center]
            lines.append(f"| {center} | {arm} | {e['n']} ({e['n_he']}) | {_ci(e)} | {_f(e.get('oracle_auc'))} | "
                         f"{_p(e.get('vs_federated'))} | {_f(e['sensitivity'], 2)} | {_f(e['specificity'], 2)} | "
                         f"{_f(e['brier'])} | {_f(e['dice'])} | {_f(e['volume_mae_ml'], 2)} | "
                         f"{_f(e.get('dice_native'))} | {_f(e.get('volume_mae_native_ml'), 2)} | "
                         f"{_f(e.get('volume_median_abs_err_native_ml'), 2)} | "
                         f"{_f(e.get('dice_native_small'))} ({e.get('n_small', 0)}) |"
                         + (f" error: {e['error'][:80]}" if "error" in e else ""))
    lines += ["", "## Figures", "",
              f"![ROC per external centre]({figures['roc']})", "",
              "ROC curves from the sites' 16-bin logit histograms (the legend gives the exact site-computed AUC).", "",
              f"![Calibration]({figures['calibration']})", "", f"![Dice]({figures['dice']})", "",
              f"![Learning curves]({figures['learning']})", ""]
    synth = [(center, m) for report in folds for center, m in report.get("stages", {}).get("synth", {}).items()]
    if synth:
        lines += ["## On-site synthesis", "",
                  "Realism gate: " + REALISM_RULE + " (random-conv-net features; a failing site trains on its real "
                  "ROIs only, so the federated arm then matches the no-synthesis ablation there).", "",
                  "Precision and recall: the fraction of synthetic ROIs inside the real HE ROIs' 3-NN manifold "
                  "(fidelity) and of real HE ROIs inside the synthetic one (diversity), same features. NN ratio: "
                  "median distance of a synthetic ROI to its nearest training ROI over that of a real patient to "
                  "the nearest other patient (about 1: new patients; near 0: copies).", "",
                  "| site | synthetic ROIs kept / needed | MMD^2 synthetic vs real HE | gate threshold | realism | "
                  "precision / recall | NN ratio | generator |",
                  "|---|---|---|---|---|---|---|---|"]
        verdict = {1: "passed", 0: "**failed: none used**", -1: "not measurable"}
        for center, m in synth:
            if "error" in m:
                lines.append(f"| {center} | failed: {m['error'][:80]} | | | | | | |")
                continue
            if "skipped-he-cases" in m:
                lines.append(f"| {center} | skipped: {int(m['skipped-he-cases'])} HE case(s) with a mask "
                             "(a generator needs 2) | | | | | | |")
                continue
            lines.append(f"| {center} | {m.get('num-kept', 0)} / {m.get('num-needed', 0)} | {_f(m.get('realism-mmd2'))} | "
                         f"{_f(m.get('realism-threshold'))} | {verdict.get(m.get('realism-passed'), '–')} | "
                         f"{_f(m.get('realism-precision'))} / {_f(m.get('realism-recall'))} | "
                         f"{_f(m.get('nn-distance-ratio'))} | {'cached' if m.get('generator-cached') else 'trained'} |")
        if any(report.get("stages", {}).get("cls-no-synthesis", {}).get("reused") for report in folds):
            lines.append("No site kept synthetic ROIs, so the no-synthesis arm is the federated arm itself "
                         "(same rounds, seeds and ROIs; not retrained).")
        lines.append("")
    if figures["synthetic"]:
        lines += ["### Synthetic HE ROIs (per site; they never left the site)", ""]
        lines += [f"{center}: ![synthetic ROIs at {center}]({path})" for center, path in figures["synthetic"]]
        lines.append("")
    lines += ["## Traffic and time", "",
              "Per trained stage: bytes sent to each site per round (the model, fp32, plus the segmentation "
              "model with classifier messages when ROIs are cut by it), mean round wall time, "
              "and the share of it not explained by the sites' own handler time on the available cores "
              "(Flower messaging, scheduling and Ray).", "",
              "| fold | stage | rounds | model MiB | MiB sent per site per round | round s | overhead share |",
              "|---|---|---|---|---|---|---|"]
    for i, fold in enumerate(metrics.get("traffic", [])):
        for stage, t in fold.items():
            lines.append(f"| {i + 1} | {stage} | {t['rounds']} | {t['model_mib']:.2f} | "
                         f"{t['sent_mib_per_site_per_round']:.2f} | {_f(t.get('round_wall_s'), 1)} | "
                         f"{_f(t.get('overhead_share'), 2)} |")
    for i, report in enumerate(folds):
        timing = report.get("timing", {})
        lines += ["", f"Fold {i + 1} phase times: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.0f} s"
                                                              for k, v in timing.items())]
    lines += ["", "## Resolved configuration", "", "```json",
              json.dumps([{"run_config": r["settings"]} for r in folds], indent=1), "```", "",
              "The full configuration of each fold (profile, model and training settings) is in its "
              "`federation/config.json`; metrics.json follows simulation/metrics.schema.json.", ""]
    return "\n".join(lines)


def write_report(metrics: dict, folds: list[dict], out: Path, elapsed_s: float) -> tuple[Path, Path]:
    out = Path(out)
    figures = {"roc": plot_roc(metrics, folds, out), "calibration": plot_calibration(metrics, folds, out),
               "dice": plot_dice(folds, out), "learning": plot_learning(folds, out),
               "synthetic": synthetic_grids(folds, out)}
    markdown = build_markdown(metrics, folds, figures, elapsed_s)
    body = MarkdownIt("commonmark").enable("table").render(markdown)
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>hemex study</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}img{max-width:100%}"
            f"</style></head><body>{body}</body></html>")
    paths = []
    for name, text in (("report.md", markdown), ("report.html", html)):
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]
