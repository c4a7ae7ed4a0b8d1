"""The `hemex` command line: one subcommand per user task. Centre lists are comma-separated
everywhere (`--train-centers A,B,C`)."""

from __future__ import annotations

import argparse

from common.cli.commands import (cmd_certs, cmd_check, cmd_phantoms, cmd_predict, cmd_synth, cmd_train_cls,
                                 cmd_train_seg)
from common.cli.federation import cmd_federate, cmd_simulate
from common.federation.settings import split_list


def federation_arguments(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--data", default=None, help="DATA_ROOT (default: generate or reuse the --cohort synthetic cohort)")
    p.add_argument("--cohort", default="paper", help="built-in synthetic cohort used when --data is absent")
    p.add_argument("--train-centers", type=split_list, default=None, help="comma-separated training centres (default: the cohort's)")
    p.add_argument("--test-centers", type=split_list, default=None, help="comma-separated held-out centres (default: the cohort's)")
    p.add_argument("--out", default=out, help="run folder")
    p.add_argument("--profile", default="cpu", help="profile in configs/profiles (cpu, gpu, smoke) or a TOML file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default="fedavg", help="fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg, krum, multikrum")
    p.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx proximal weight (with --strategy fedprox)")
    p.add_argument("--fedbn", action="store_true", help="keep normalisation layers local to each site (FedBN)")
    p.add_argument("--dp-noise-multiplier", type=float, default=0.0,
                   help="> 0: server-side differential privacy (clipped site updates, Gaussian noise)")
    p.add_argument("--dp-clipping-norm", type=float, default=1.0, help="L2 bound of each site's update under DP")
    p.add_argument("--seg-rounds", type=int, default=3)
    p.add_argument("--seg-epochs", type=int, default=2, help="local segmentation epochs per round")
    p.add_argument("--ssl-rounds", type=int, default=0,
                   help="rounds of federated self-supervised pretraining of the classifier's encoder (0: none)")
    p.add_argument("--cls-rounds", type=int, default=3)
    p.add_argument("--cls-epochs", type=int, default=4, help="local classifier epochs per round")
    p.add_argument("--synthesis", default="1:2", help="on-site synthetic HE ROIs to reach HE:NHE = 1:2, 1:1, or none")
    p.add_argument("--bundle-key", default="",
                   help="Ed25519 key (hemex certs: bundle.key) that signs the model bundle")
    p.add_argument("--fresh", action="store_true",
                   help="start afresh instead of resuming from --out's checkpoints (resume = false)")
    p.add_argument("--min-aggregate-cases", type=int, default=5,
                   help="sites withhold aggregates (metrics, Dice summaries, histograms) of fewer cases")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hemex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantoms", help="generate a synthetic multicentre NCCT cohort in the site data contract")
    p.add_argument("--out", required=True, help="output DATA_ROOT (must not exist or be empty)")
    p.add_argument("--cohort", default="paper", help="cohort name in configs/cohorts (paper, tiny, full) or a TOML file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: up to 2 cores)")
    p.add_argument("--preview", help="also write a PNG grid of axial slices through hematomas")
    p.add_argument("--reuse", action="store_true", help="if --out already holds this cohort and seed, only summarize it")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("simulate", help="the main job: a whole simulated multicentre study (federated, local-only, "
                                        "centralized and no-synthesis arms) with metrics.json and a report")
    federation_arguments(p, "runs/simulate")
    p.add_argument("--leave-one-out", action="store_true",
                   help="one federation per centre, each centre held out in turn (all --train-centers)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: the study once per seed into OUT/seed-<n>/ (built-in cohort: a new "
                        "cohort draw each), then seeds.json / seeds.md across seeds (replaces --seed)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("federate", help="simulate a federation on this machine: one virtual site per centre, "
                                        "held-out centres evaluated only")
    federation_arguments(p, "runs/federate")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("check", help="validate a site's data against the data contract")
    p.add_argument("data_root", help="DATA_ROOT with one folder per centre")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train-cls", help="train the HE classifier (ViT on hematoma ROIs) centrally and evaluate "
                                         "it, with volume and marker baselines, on external centres")
    p.add_argument("--data", required=True, help="DATA_ROOT with one folder per centre")
    p.add_argument("--train-centers", type=split_list, required=True, help="comma-separated centres to train on")
    p.add_argument("--test-centers", type=split_list, required=True, help="comma-separated external centres, never used for any fitting")
    p.add_argument("--out", required=True, help="output folder (metrics.json, config.json, weights, plots)")
    p.add_argument("--profile", default="cpu", help="profile in configs/profiles (cpu, gpu) or a TOML file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override classifier.epochs of the profile")
    p.add_argument("--steps", type=int, default=None, help="override classifier.steps (optimizer steps; > 0 wins over epochs)")
    p.add_argument("--max-seconds", type=float, default=None, help="wall-clock cap on ViT training")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_train_cls)
    p = sub.add_parser("synth", help="train a HE ROI generator on one centre, generate synthetic HE ROIs to reach "
                                     "a HE:NHE ratio, and audit them for memorization")
    p.add_argument("--data", required=True, help="DATA_ROOT with one folder per centre")
    p.add_argument("--center", required=True, help="the centre whose HE cases (reference masks) train the generator")
    p.add_argument("--out", required=True, help="output folder: synthetic_he.npz, audit.json, quality.png, config.json")
    p.add_argument("--profile", default="cpu", help="run profile in configs/profiles or a TOML file ([synthesis] section)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", default=None, help="target HE:NHE ratio: 1:2 (profile default), 1:1 or none")
    p.add_argument("--generator", choices=["ukan", "unet"], default=None,
                   help="ukan (Diffusion-UKAN) or unet (MONAI DiffusionModelUNet baseline); default from the profile")
    p.add_argument("--steps", type=int, default=None, help="override the profile's training steps")
    p.add_argument("--cache-dir", default=None,
                   help="keep the trained generator here and reuse it when data, settings and seed are unchanged")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_synth)
    p = sub.add_parser("certs", help="create a development CA, the SuperLink's TLS certificate and SuperNode "
                                     "authentication keys for a Flower deployment")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty; never overwritten)")
    p.add_argument("--nodes", default="", help="comma-separated node (centre) ids: one ECDSA SECP384R1 key pair "
                                               "each, in OpenSSH format (e.g. center1,center2,center3)")
    p.add_argument("--host", default="127.0.0.1",
                   help="comma-separated DNS names / IP addresses sites use to reach the SuperLink; the server "
                        "certificate is valid for them plus localhost and 127.0.0.1")
    p.add_argument("--days", type=int, default=365, help="server certificate validity in days")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("train-seg", help="train hematoma segmentation centrally and test it on unseen centres")
    p.add_argument("--data", required=True, help="DATA_ROOT with one folder per centre")
    p.add_argument("--train-centers", type=split_list, required=True, help="comma-separated training centre ids")
    p.add_argument("--test-centers", type=split_list, required=True, help="comma-separated external test centre ids")
    p.add_argument("--out", required=True, help="output folder for the model, metrics.json and config.json")
    p.add_argument("--model", default=None, help="architecture (umamba-bot, umamba-enc, unet, segresnet); "
                   "default: the profile's")
    p.add_argument("--profile", default="cpu", help="run profile in configs/profiles (cpu, gpu) or a TOML file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the profile's)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="batches per epoch (default: the profile's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("predict", help="hematoma mask, volume and HE probability for new NCCT scans "
                                       "(NIfTI file, DICOM series folder, or a folder of such cases)")
    p.add_argument("input", help="NIfTI file, DICOM series folder, or a folder of cases (batch)")
    p.add_argument("--model", required=True, help="model bundle folder (segmentation/, classifier/, manifest.json)")
    p.add_argument("--out", required=True, help="output folder: one subfolder per case plus summary.json")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--trusted-key", default=None,
                   help="the coordinator's bundle.pub: refuse a bundle it did not sign (default: $HEMEX_TRUSTED_KEY)")
    p.set_defaults(func=cmd_predict)
    return parser
