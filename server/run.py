"""The coordinator's run: discover the sites, train each model in rounds on the training
centres, then evaluate the final weights on every centre (held-out ones included)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import __version__
from common.config import load_profile
from common.errors import ConfigError
from common.federation import binned
from common.inference.bundle import write_manifest
from common.federation.records import to_record
from common.federation.settings import FederationSettings
from common.training.central import IN_CHANNELS_PER_WINDOW, OUT_CHANNELS, package_versions
from common.training.checkpoint import architecture, build_model, save_checkpoint
from common.training.classification import ClassifierSettings, save_classifier
from common.training.classification import create_model as create_classifier_model
from common.training.segmentation import seed_everything
from common.training.settings import SegmentationSettings
from server.checkpoint import ServerCheckpoints
from server.grid import StageGrid
from server.strategies import build_strategy


class FederatedRun:
    def __init__(self, grid: Grid, settings: FederationSettings, log=None):
        self.grid = grid
        self.settings = settings
        self.log = log or (lambda text: print(f"hemex: {text}", flush=True))
        self.out = Path(settings.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints = ServerCheckpoints(self.out / "checkpoints")
        self.profile = load_profile(settings.profile)
        overrides = {"model": settings.seg_model} if settings.seg_model else {}
        self.seg = SegmentationSettings.from_profile(self.profile, **overrides)
        self.cls = ClassifierSettings.from_profile(self.profile)
        self.centers: dict[str, int] = {}
        self.report: dict = {"settings": settings.to_run_config(), "stages": {}, "timing": {}}

    # --------------------------------------------------------------------------------------
    def discover(self) -> dict[str, int]:
        """Map centre ids to node ids, waiting at most node-wait-s for every expected centre."""
        expected = set(self.settings.centers)
        deadline = time.monotonic() + self.settings.node_wait_s
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= len(expected) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.info")
                    for n in nodes]
        # A first message makes each site load its app and libraries: allow a round's timeout.
        replies = self.grid.send_and_receive(messages, timeout=self.settings.round_timeout_s) if messages else []
        centers, counts = {}, {}
        for reply in replies:
            if reply.has_error():
                self.log(f"node {reply.metadata.src_node_id} failed to describe itself: {reply.error.reason}")
                continue
            center = str(reply.content["info"]["center"])
            if center in centers:
                raise ConfigError(f"two nodes claim centre {center!r} (nodes {centers[center]} and "
                                  f"{reply.metadata.src_node_id})")
            centers[center] = reply.metadata.src_node_id
            counts[center] = dict(reply.content["metrics"])
        missing = expected - set(centers)
        if missing:
            raise ConfigError(f"no node answered for centre(s) {', '.join(sorted(missing))} within node-wait-s / "
                              f"round-timeout-s (answered: {', '.join(sorted(centers)) or 'none'}; "
                              f"{len(nodes)} node(s) connected)")
        self.centers = {c: centers[c] for c in self.settings.centers}
        self.report["centers"] = {c: {**counts[c], "role": "test" if c in self.settings.test_centers else "train"}
                                  for c in self.settings.centers}
        return self.centers

    # --------------------------------------------------------------------------------------
    def seg_architecture(self) -> dict:
        windows = self.profile["preprocess"]["windows"]
        return architecture(self.seg.model, len(windows) * IN_CHANNELS_PER_WINDOW, OUT_CHANNELS,
                            self.seg.model_overrides)

    def train_stage(self, stage: str, initial: ArrayRecord, num_rounds: int) -> ArrayRecord:
        """Run `num_rounds` rounds of `stage` on the training centres, checkpointing each round;
        resume from the last checkpoint when one exists."""
        start_round, history = 0, []
        latest = self.checkpoints.latest(stage) if self.settings.resume else None
        if latest is not None:
            start_round, initial, record = latest
            history = record.get("history", [])
            self.log(f"{stage}: resuming after round {start_round} of {num_rounds}")
        if start_round >= num_rounds:
            self.report["stages"][stage] = {"rounds": history, "resumed_after": start_round}
            return initial
        train_nodes = {self.centers[c]: c for c in self.settings.train_centers}
        stage_grid = StageGrid(self.grid, train_nodes, stage)
        strategy = build_strategy(self.settings, len(train_nodes))

        def after_round(server_round: int, arrays: ArrayRecord):
            if server_round == 0:
                return None
            global_round = start_round + server_round
            entry = {"round": global_round}
            for kind in ("train", "evaluate"):
                calls = stage_grid.rounds.get(f"{kind}.{stage}", [])
                if len(calls) >= server_round:
                    entry[kind] = calls[server_round - 1]
            history.append(entry)
            self.checkpoints.save(stage, global_round, arrays, {"history": history})
            self.log(f"{stage}: round {global_round}/{num_rounds} done: {summarize_round(entry)}")
            return None

        config = ConfigRecord({"round-offset": start_round})
        result = strategy.start(grid=stage_grid, initial_arrays=initial, num_rounds=num_rounds - start_round,
                                timeout=self.settings.round_timeout_s, train_config=config,
                                evaluate_config=ConfigRecord({"split": "validation", "round-offset": start_round}),
                                evaluate_fn=after_round)
        self.report["stages"][stage] = {"rounds": history, "resumed_after": start_round,
                                        "aggregated_train": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()},
                                        "aggregated_validation": {str(k): dict(v) for k, v in
                                                                  result.evaluate_metrics_clientapp.items()}}
        return result.arrays if result.arrays is not None else initial

    def evaluate_everywhere(self, stage: str, arrays: ArrayRecord) -> dict[str, dict]:
        """Final weights evaluated at every centre: all local cases of held-out centres, the
        validation split of training centres. Only aggregate metrics come back."""
        results = {}
        for split, centers in (("all", self.settings.test_centers), ("validation", self.settings.train_centers)):
            nodes = {c: self.centers[c] for c in centers}
            if nodes:
                content = RecordDict({"arrays": arrays, "config": ConfigRecord({"split": split})})
                results.update(self.send(f"evaluate.{stage}", nodes, content))
        return {c: results[c] for c in self.centers}

    # --------------------------------------------------------------------------------------
    def execute(self) -> dict:
        started = time.time()
        self.discover()
        self.log(f"centres: train {', '.join(self.settings.train_centers)}; "
                 f"held out {', '.join(self.settings.test_centers) or 'none'}")
        seed_everything(self.settings.seed)
        arch = self.seg_architecture()
        seg_started = time.time()
        seg_arrays = self.train_stage("seg", to_record(build_model(arch).state_dict()), self.settings.seg_rounds)
        self.report["timing"]["seg_seconds"] = time.time() - seg_started
        self.report["stages"].setdefault("seg", {})["final"] = self.evaluate_everywhere("seg", seg_arrays)
        bundle = self.out / "model"
        save_checkpoint(bundle / "segmentation", seg_arrays.to_torch_state_dict(), arch,
                        {"seed": self.settings.seed, "train_centers": list(self.settings.train_centers),
                         "rounds": self.settings.seg_rounds, "strategy": self.settings.strategy})
        self.report["model_bytes"] = {"seg": seg_arrays.count_bytes()}
        if self.settings.cls_rounds > 0 and self.settings.synthesis != "none":
            synth_started = time.time()
            train_nodes = {c: self.centers[c] for c in self.settings.train_centers}
            results = self.send("query.synth", train_nodes, RecordDict({"config": ConfigRecord({})}))
            self.report["stages"]["synth"] = results
            self.report["timing"]["synth_seconds"] = time.time() - synth_started
            self.log("synth: " + "; ".join(f"{c}: kept {m.get('num-kept', 0)} of {m.get('num-needed', 0)} needed"
                                           if "error" not in m else f"{c}: failed ({m['error'][:80]})"
                                           for c, m in results.items()))
        if self.settings.cls_rounds > 0:
            cls_started = time.time()
            cls_arrays, operating_point = self.classifier(seg_arrays)
            self.report["timing"]["cls_seconds"] = time.time() - cls_started
            self.report["model_bytes"]["cls"] = cls_arrays.count_bytes()
            save_classifier(bundle / "classifier", cls_arrays.to_torch_state_dict(),
                            {"settings": self.cls.as_dict(), "windows": self.profile["preprocess"]["windows"],
                             "calibration": {"method": "platt-binned", "a": operating_point["calib-a"],
                                             "b": operating_point["calib-b"], "n": operating_point["n"]},
                             "threshold": operating_point["threshold"],
                             "train_centers": list(self.settings.train_centers), "rounds": self.settings.cls_rounds,
                             "seed": self.settings.seed})
            # Checksums, preprocessing and provenance: what `hemex predict` verifies and needs.
            write_manifest(bundle, {"profile": self.profile["name"], "centers": list(self.settings.train_centers),
                                    "held_out": list(self.settings.test_centers), "seed": self.settings.seed,
                                    "seg_rounds": self.settings.seg_rounds, "cls_rounds": self.settings.cls_rounds,
                                    "strategy": self.settings.strategy, "synthesis": self.settings.synthesis,
                                    "cases": {c: info.get("num-cases") for c, info in self.report["centers"].items()
                                              if c in self.settings.train_centers}})
        self.report["timing"]["total_seconds"] = time.time() - started
        self.report["versions"] = {"hemex": __version__, **package_versions()}
        write_json(self.out / "federation.json", self.report)
        write_json(self.out / "config.json", {"run_config": self.settings.to_run_config(),
                                              "profile": self.profile, "segmentation": self.seg.as_dict(),
                                              "classifier": self.cls.as_dict(), "architecture": arch})
        return self.report

    def classifier(self, seg_arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        """Classifier rounds, then an operating point fixed on the training centres' validation
        histograms, then evaluation everywhere with ROIs from the federated segmentation."""
        windows = self.profile["preprocess"]["windows"]
        cls_arrays = self.train_stage("cls", to_record(create_classifier_model(self.cls, windows).state_dict()),
                                      self.settings.cls_rounds)
        train_nodes = {c: self.centers[c] for c in self.settings.train_centers}
        validation = self.send("evaluate.cls", train_nodes, RecordDict(
            {"arrays": cls_arrays, "config": ConfigRecord({"split": "validation", "mask-source": "reference"})}))
        he, nhe = binned.from_metrics([m for m in validation.values() if "error" not in m])
        point = {**binned.fit_operating_point(he, nhe), "n": int(he.sum() + nhe.sum())}
        self.log(f"cls: operating point from {point['n']} training-centre validation cases: "
                 f"threshold {point['threshold']:.3f}, Platt a={point['calib-a']:.3f} b={point['calib-b']:.3f}")
        config = {k: point[k] for k in ("calib-a", "calib-b", "threshold")}
        test_nodes = {c: self.centers[c] for c in self.settings.test_centers}
        final = self.send("evaluate.cls", test_nodes, RecordDict(
            {"arrays": cls_arrays, "seg-arrays": seg_arrays,
             "config": ConfigRecord({**config, "split": "all", "mask-source": "segmentation"})})) if test_nodes else {}
        stage = self.report["stages"].setdefault("cls", {})
        # Training centres report their validation split only: their other cases trained the model.
        stage.update(operating_point=point, final=_without_histograms({**validation, **final}))
        return cls_arrays, point

    def send(self, message_type: str, nodes: dict[str, int], content: RecordDict) -> dict[str, dict]:
        """One message per centre; the replies' aggregate metrics (or the error) per centre."""
        messages = [Message(content, dst_node_id=node, message_type=message_type) for node in nodes.values()]
        replies = self.grid.send_and_receive(messages, timeout=self.settings.round_timeout_s)
        by_node = {node: center for center, node in nodes.items()}
        results = {center: {"error": "no reply before the timeout"} for center in nodes}
        for reply in replies:
            center = by_node.get(reply.metadata.src_node_id)
            if center is None:
                continue
            results[center] = ({"error": reply.error.reason} if reply.has_error()
                               else dict(next(iter(reply.content.metric_records.values()))))
        return results


def _without_histograms(results: dict[str, dict]) -> dict[str, dict]:
    return {c: {k: v for k, v in m.items() if not k.startswith("hist-")} for c, m in results.items()}


def summarize_round(entry: dict) -> str:
    parts = []
    for kind, key in (("train", "train-loss"), ("evaluate", "dice")):
        metrics = entry.get(kind, {}).get("metrics", {})
        values = [m[key] for m in metrics.values() if key in m]
        if values:
            parts.append(f"{kind} {key} " + ", ".join(f"{c}={m[key]:.3f}" for c, m in metrics.items() if key in m))
        errors = entry.get(kind, {}).get("errors", {})
        if errors:
            parts.append(f"{kind} errors at {', '.join(errors)}")
    return "; ".join(parts) or "no metrics"


def write_json(path: Path, payload) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
