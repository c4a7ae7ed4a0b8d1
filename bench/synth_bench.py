"""On-site synthesis: how much realism costs (--curve), and whether synthetic HE ROIs help the ViT.

Learning curves (--curve): each training centre's generator, trained on that centre's HE ROIs as
`hemex synth` and the federation train it, for each approach (GEN-OBJECTIVE[-mask], e.g. ukan-flow,
ukan-epsilon, unet-flow, ukan-flow-mask: generated around the site's own HE masks); after every
checkpoint the EMA model samples as many candidates as the site would (what it needs, at least
the gate's realism_samples), and the bench reports training seconds, the realism gate's MMD^2
and threshold, k-NN precision/recall and the memorization audit's NN distance ratio.

    .venv/bin/python bench/synth_bench.py --curve --data runs/paper-seed1/cohort-paper-seed1 --out runs/bench-curve

Ablation (default): does adding synthetic HE ROIs help the ViT? One run, one budget for every arm:

    arms      none | ukan 1:2 | ukan 1:1 | unet 1:2 | unet 1:1   (default)
              controls, on request: copy R (real HE training ROIs repeated to ratio R: plain
              oversampling, what synthesis must beat) and noise R (smoothed random images with
              random blob masks labelled HE: separates "more positives / another loss balance"
              from what the generator actually learnt)
    data      training centres (default center1-3) -> ViT; external centres (center4-5) -> AUC
    generator one per kind, trained on the pooled HE ROIs of the training centres (reference
              masks) for the same number of steps; candidates pass the memorization audit; the
              1:2 arm uses the first accepted samples of the 1:1 pool (nested sets)
    ViT       the profile's [classifier] settings, the same optimizer steps in every arm (a fixed
              step budget, not epochs: synthetic samples would otherwise buy extra steps)
    report    external AUC per arm with DeLong 95 % CIs (pooled and per centre), the paired
              DeLong difference against "none", generator step time, time per generated sample,
              audit counts and feature distance. JSON + a Markdown table in --out.

    .venv/bin/python bench/synth_bench.py --data /tmp/paper_cohort --out runs/bench-synth

Note: generators here are trained centrally on the pooled training centres (the federated run
trains one per site with `hemex synth`); with ~20 % HE this is ~25 HE cases. External AUC CIs
at ~100 external cases are about +-0.1 wide, so only large effects can show.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/paper-seed0", help="cohort DATA_ROOT (default: the make simulate cohort)")
    parser.add_argument("--train-centers", default="center1,center2,center3")
    parser.add_argument("--test-centers", default="center4,center5")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-steps", type=int, default=None, help="generator training steps (default: profile)")
    parser.add_argument("--cls-steps", type=int, default=None, help="ViT optimizer steps per arm (default: profile epochs "
                        "on the real set, converted to steps)")
    parser.add_argument("--arms", default="none,ukan:1:2,ukan:1:1,unet:1:2,unet:1:1",
                        help="comma-separated arms: none | GEN:RATIO with GEN ukan, unet (generating the mask), ukan-mask, "
                             "unet-mask (drawing around the site's HE masks), copy or noise; a '#N' suffix "
                             "trains that arm's classifier with seed + N (e.g. none#1: the seed-to-seed spread)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench-synth")
    parser.add_argument("--curve", action="store_true", help="learning curves per training centre instead of the ablation")
    parser.add_argument("--approaches", default="ukan-flow,ukan-epsilon,ukan-v",
                        help="--curve: comma-separated GEN-OBJECTIVE[-mask] (GEN ukan or unet; OBJECTIVE flow, epsilon or v; "
                             "-mask: generated around the site's HE masks)")
    parser.add_argument("--checkpoints", default="100,200,400,600,800,1200",
                        help="--curve: training steps after which the generator is sampled and scored")
    args = parser.parse_args(argv)
    if args.curve:
        return learning_curves(args)

    started = time.time()
    out, profile, windows = setup(args)
    from common.data.contract import read_cohort
    from common.metrics.classification import delong_ci, delong_test
    from common.synthesis.ratio import parse_ratio, synthetic_needed
    from common.synthesis.run import load_center_rois, resize_rois, synthesize
    from common.synthesis.settings import synthesis_settings
    from common.files import seed_everything
    from common.training.classification.prediction import case_logits
    from common.training.classification.rois import build_roi_dataset
    from common.training.classification.settings import ClassifierSettings, create_model
    from common.training.classification.training import Budget, train_classifier

    cls = ClassifierSettings.from_profile(profile)
    syn = synthesis_settings(profile, train_steps=args.gen_steps)
    train_centers = [c for c in args.train_centers.split(",") if c]
    test_centers = [c for c in args.test_centers.split(",") if c]
    arms = []
    for spec in args.arms.split(","):
        spec, _, offset = spec.partition("#")  # "none#1": the same arm with classifier seed + 1
        parts = spec.split(":")
        arm = ("none", "none") if parts[0] == "none" else (parts[0], ":".join(parts[1:]))
        arms.append((*arm, int(offset or 0)))

    # ---------------------------------------------------------------- ROIs (the classifier's own)
    cohort = read_cohort(Path(args.data), train_centers + test_centers)
    t0 = time.time()
    train = build_roi_dataset([c for center in train_centers for c in cohort[center]], cls, windows=windows,
                              with_markers=False)
    test = build_roi_dataset([c for center in test_centers for c in cohort[center]], cls, windows=windows,
                             with_markers=False)
    roi_seconds = time.time() - t0
    y_train = train.labels()
    y_test = test.labels()
    k = cls.k_slices
    log(f"ROIs: {len(train.cases)} training cases ({int(y_train.sum())} HE), {len(test.cases)} external "
        f"({int(y_test.sum())} HE), {roi_seconds:.0f} s; excluded {len(train.excluded) + len(test.excluded)}")
    he_cases = [r for r in train.cases if r.he == 1]
    he_images = np.concatenate([r.images for r in he_cases]).astype(np.float32)
    he_masks = np.concatenate([r.masks for r in he_cases]).astype(np.float32)
    n_he_slices = int(y_train.sum()) * k
    n_nhe_slices = int((y_train == 0).sum()) * k
    needed = {ratio: synthetic_needed(n_he_slices, n_nhe_slices, ratio) for _, ratio, _ in arms}
    max_needed = max(needed.values())
    largest_ratio = max((r for _, r, _ in arms if r != "none"), key=lambda r: np.divide(*parse_ratio(r)), default="1:2")
    log(f"synthetic ROIs needed: {needed} (HE {n_he_slices} / NHE {n_nhe_slices} slices)")

    # ---------------------------------------------------------------- generators
    generators = {}
    rng = np.random.default_rng(args.seed)
    if any(g == "copy" for g, _, _ in arms):
        order = rng.permutation(len(he_images))
        reps = np.resize(order, max_needed)
        generators["copy"] = {"record": None, "images": he_images[reps], "masks": he_masks[reps]}
    if any(g == "noise" for g, _, _ in arms):
        from scipy.ndimage import gaussian_filter

        noise = gaussian_filter(rng.random((max_needed, he_images.shape[1], cls.pixels, cls.pixels)),
                                sigma=(0, 0, 2, 2)).astype(np.float32)
        noise = np.clip((noise - noise.mean()) / (noise.std() + 1e-6) * he_images.std() + he_images.mean(), 0, 1)
        blobs = gaussian_filter(rng.random((max_needed, cls.pixels, cls.pixels)), sigma=(0, 4, 4))
        noise_masks = (blobs > np.quantile(blobs, 1 - he_masks.mean())).astype(np.float32)
        generators["noise"] = {"record": None, "images": noise.astype(np.float32), "masks": noise_masks}
    for kind in sorted({g for g, _, _ in arms if g not in ("none", "copy", "noise")}):
        # One generator per training centre, as the federation trains them (synthesize(): the
        # site's HE ROIs, its own need at the largest ratio asked for, the memorization audit and
        # the realism gate); the smaller ratio takes the first accepted samples of each site's set.
        # KIND is ukan or unet, generating the mask too, or ukan-mask / unet-mask, drawing around the
        # site's own HE masks (mask_condition), whatever the profile says.
        settings = syn.with_overrides(generator=kind.removesuffix("-mask"), ratio=largest_ratio,
                                      mask_condition=kind.endswith("-mask"))
        images, masks, record = [], [], {}
        for center in train_centers:
            rois = load_center_rois(Path(args.data), center, settings, windows, include_nhe=True)
            result, _ = synthesize(rois, settings, seed=args.seed, log=lambda _m: None, cache_dir=out / "cache")
            up, up_masks = resize_rois(result.images, cls.pixels, result.masks)
            images.append(up)
            masks.append(up_masks.astype(np.float32) if up_masks is not None
                         else np.zeros((len(up), cls.pixels, cls.pixels), np.float32))
            audit = result.audit
            record[center] = {"kept": audit["memorization"]["kept"], "needed": audit["memorization"]["needed"],
                              "realism": audit.get("realism"), "training": audit["training"],
                              "precision": audit.get("feature_distance", {}).get("precision"),
                              "recall": audit.get("feature_distance", {}).get("recall"),
                              "seconds_per_sample": audit["timing"]["seconds_per_sample"]}
            realism = audit.get("realism") or {}
            log(f"{kind} at {center}: kept {audit['memorization']['kept']}/{audit['memorization']['needed']}, "
                f"MMD^2 {realism.get('mmd2_synthetic', float('nan')):.3f} (gate {realism.get('mmd2_threshold', float('nan')):.3f}), "
                f"{audit['training']['steps']} steps{' (cached)' if audit['training']['cached'] else ''}")
        # Interleave the sites' sets so that "the first n" takes from every site alike.
        order = np.argsort(np.concatenate([np.arange(len(x)) / max(1, len(x)) for x in images]), kind="stable")
        generators[kind] = {"record": record, "images": np.concatenate(images)[order],
                            "masks": np.concatenate(masks)[order]}
        np.savez_compressed(out / f"synthetic_{kind}.npz", images=generators[kind]["images"],
                            masks=generators[kind]["masks"])

    # ---------------------------------------------------------------- classifier arms
    real_slices = n_he_slices + n_nhe_slices
    steps = args.cls_steps or cls.steps or cls.epochs * max(1, real_slices // min(cls.batch_size, real_slices))
    results = []
    scores = {}
    for kind, ratio, offset in arms:
        name = ("none" if kind == "none" else f"{kind} {ratio}") + (f" (seed +{offset})" if offset else "")
        extra = extra_masks = None
        n_extra = 0
        if kind != "none":
            n_extra = min(needed[ratio], len(generators[kind]["images"]))
            extra = generators[kind]["images"][:n_extra]
            extra_masks = generators[kind]["masks"][:n_extra]
        seed_everything(args.seed + offset)  # the same initial weights in every arm of a seed
        model = create_model(cls, windows)
        t0 = time.time()
        result = train_classifier(model, train.cases, Budget(steps=steps), seed=args.seed + offset, extra_he_rois=extra,
                                  extra_he_masks=extra_masks, settings=cls, windows=windows)
        z = case_logits(model, test.cases, cls)
        scores[name] = z
        row = {"arm": name, "generator": kind, "ratio": ratio, "synthetic": int(n_extra),
               "synthetic_needed": int(needed[ratio]), "train_seconds": time.time() - t0,
               "train_loss": result.metrics["train_loss"]}
        a, lo, hi, _ = delong_ci(y_test, z)
        row["external_auc"] = [a, lo, hi]
        for center in test_centers:
            mask = np.array([r.center == center for r in test.cases])
            a, lo, hi, _ = delong_ci(y_test[mask], z[mask])
            row[f"auc_{center}"] = [a, lo, hi]
        if name != "none" and "none" in scores:
            row["vs_none"] = delong_test(y_test, z, scores["none"])
        results.append(row)
        log(f"{name}: external AUC {row['external_auc'][0]:.3f} [{row['external_auc'][1]:.3f}, "
            f"{row['external_auc'][2]:.3f}] ({row['train_seconds']:.0f} s)")

    record = {"data": str(args.data), "train_centers": train_centers, "test_centers": test_centers,
              "profile": args.profile, "seed": args.seed, "classifier": cls.as_dict(), "classifier_steps": steps,
              "synthesis": syn.as_dict(), "generators": {k: v["record"] for k, v in generators.items() if v["record"]},
              "arms": results, "seconds": time.time() - started, "threads": args.threads,
              "external": {"cases": int(len(y_test)), "he": int(y_test.sum())}}
    tmp = out / ".synth_bench.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, out / "synth_bench.json")
    table = markdown(record)
    tmp = out / ".synth_bench.md.tmp"
    tmp.write_text(table, encoding="utf-8")
    os.replace(tmp, out / "synth_bench.md")
    print(table)
    return 0


def setup(args) -> tuple[Path, dict, list]:
    """Threads, the output folder, the profile and its HU windows: what both modes start from."""
    import torch

    from common.config import load_profile

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = load_profile(args.profile)
    return out, profile, [tuple(w) for w in profile["preprocess"]["windows"]]


def learning_curves(args) -> int:
    """Quality against training time for each approach at each training centre (see the module note)."""
    from common.synthesis.audit import feature_distance, memorization_audit, realism_verdict
    from common.synthesis.diffusion import train_generator
    from common.synthesis.ratio import synthetic_needed
    from common.synthesis.run import generate, generator_inputs, load_center_rois
    from common.synthesis.settings import synthesis_settings

    started = time.time()
    out, profile, windows = setup(args)
    base = synthesis_settings(profile)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if c})
    rows = []
    for center in [c for c in args.train_centers.split(",") if c]:
        rois = load_center_rois(Path(args.data), center, base, windows, include_nhe=True)
        he = rois.labels == 1
        real_he, real_nhe = rois.images[he], rois.images[~he]
        k = base.slices_per_case
        # As synthesize(): the candidates the site needs, at least realism_samples for the gate's MMD^2.
        n = max(base.realism_samples, int(math.ceil(synthetic_needed(rois.n_he_cases * k, rois.n_nhe_cases * k,
                                                                     base.ratio) * base.oversample)))
        class_distance = feature_distance(real_he, real_nhe, seed=0)["real_vs_synthetic"] if len(real_nhe) >= 2 \
            else None
        log(f"{center}: {int(he.sum())} HE ROIs, {n} candidates per checkpoint, real NHE vs HE MMD^2 {class_distance}")
        for approach in [a for a in args.approaches.split(",") if a]:
            # GEN-OBJECTIVE[-mask]: "-mask" generates around the site's HE masks (mask_condition).
            generator, _, objective = approach.removesuffix("-mask").partition("-")
            settings = base.with_overrides(generator=generator, objective=objective or base.objective,
                                           train_steps=max(checkpoints), mask_condition=approach.endswith("-mask"))
            inputs = generator_inputs(rois, settings)
            # As synthesize(): all labelled ROIs with their labels (sampled as HE) or the HE ROIs alone.
            inputs, labels = (inputs, rois.labels) if settings.conditional else (inputs[he], None)
            timing = {"train": 0.0, "last": time.perf_counter()}

            def score(step, trained):
                if step not in checkpoints:
                    return
                timing["train"] += time.perf_counter() - timing["last"]
                t0 = time.perf_counter()
                candidates = generate(trained, n, args.seed + 1, rois.masks[he])[:, : real_he.shape[1]]
                sample_seconds = time.perf_counter() - t0
                distance = feature_distance(real_he, candidates, seed=0)
                distance["real_nhe_vs_real_he"] = class_distance
                verdict = realism_verdict(distance)
                memo = memorization_audit(candidates, real_he, rois.groups[he], settings.audit_percentile,
                                          settings.audit_max_shift, include_flips=settings.hflip)["summary"]
                row = {"center": center, "approach": approach, "step": step, "train_seconds": timing["train"],
                       "sample_seconds": sample_seconds, "mmd2": verdict["mmd2_synthetic"],
                       "threshold": verdict["mmd2_threshold"], "passed": verdict["passed"],
                       "precision": distance["precision"], "recall": distance["recall"],
                       "nn_distance_ratio": memo["nn_distance_ratio"], "audit_accepted": memo["accepted"],
                       "candidates": memo["synthetic"]}
                rows.append(row)
                log(f"{center} {approach} step {step}: {timing['train']:.0f} s, MMD^2 {row['mmd2']:.3f} "
                    f"(gate {row['threshold']:.3f}: {'pass' if row['passed'] else 'fail'}), precision "
                    f"{row['precision']:.2f} recall {row['recall']:.2f}, NN ratio {row['nn_distance_ratio']:.2f}")
                timing["last"] = time.perf_counter()

            train_generator(inputs, settings, seed=args.seed, labels=labels, checkpoints=score)
    record = {"data": str(args.data), "profile": args.profile, "seed": args.seed, "threads": args.threads,
              "synthesis": base.as_dict(), "rows": rows, "seconds": time.time() - started}
    tmp = out / ".synth_curve.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, out / "synth_curve.json")
    lines = [f"Learning curves on {args.data} (seed {args.seed}, {args.threads} thread(s)): MMD^2 to the site's real "
             "HE ROIs vs its realism gate, 3-NN precision / recall, memorization NN distance ratio", "",
             "| centre | approach | steps | train s | MMD^2 | gate | precision | recall | NN ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['center']} | {r['approach']} | {r['step']} | {r['train_seconds']:.0f} | {r['mmd2']:.3f} | "
                     f"{r['threshold']:.3f} {'pass' if r['passed'] else 'fail'} | {r['precision']:.2f} | "
                     f"{r['recall']:.2f} | {r['nn_distance_ratio']:.2f} |")
    table = "\n".join(lines) + "\n"
    tmp = out / ".synth_curve.md.tmp"
    tmp.write_text(table, encoding="utf-8")
    os.replace(tmp, out / "synth_curve.md")
    print(table)
    return 0


def markdown(record: dict) -> str:
    lines = [f"External AUC (DeLong 95 % CI) on {', '.join(record['test_centers'])} "
             f"({record['external']['cases']} cases, {record['external']['he']} HE); ViT {record['classifier']['model']}, "
             f"{record['classifier_steps']} steps per arm, seed {record['seed']}", "",
             "| arm | synthetic ROIs | external AUC | " + " | ".join(record["test_centers"]) + " | diff vs none (p) |",
             "| --- | --- | --- | " + " | ".join("---" for _ in record["test_centers"]) + " | --- |"]
    for row in record["arms"]:
        a = row["external_auc"]
        per = " | ".join(f"{row[f'auc_{c}'][0]:.3f} [{row[f'auc_{c}'][1]:.2f}, {row[f'auc_{c}'][2]:.2f}]"
                         for c in record["test_centers"])
        vs = row.get("vs_none")
        diff = f"{vs['diff']:+.3f} (p={vs['p']:.2f})" if vs else "-"
        lines.append(f"| {row['arm']} | {row['synthetic']} | {a[0]:.3f} [{a[1]:.2f}, {a[2]:.2f}] | {per} | {diff} |")
    lines += ["", "| generator | site | kept / needed | MMD^2 (gate) | precision / recall | steps | s / step |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind, sites in record["generators"].items():
        for center, g in sites.items():
            realism, training = g.get("realism") or {}, g.get("training") or {}
            lines.append(f"| {kind} | {center} | {g['kept']}/{g['needed']} | "
                         f"{realism.get('mmd2_synthetic', float('nan')):.3f} ({realism.get('mmd2_threshold', float('nan')):.3f}) | "
                         f"{g.get('precision') or float('nan'):.2f} / {g.get('recall') or float('nan'):.2f} | "
                         f"{training.get('steps', 0)} | {training.get('seconds_per_step', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
