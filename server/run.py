"""The coordinator's run: discover the sites, train each model in rounds on the training
centres, then evaluate the final weights on every centre (held-out ones included)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import __version__
from common.config import load_profile
from common.files import seed_everything, versions, write_json
from common.federation.progress import EVENTS_NAME, ProgressLog
from common.federation.records import to_record
from common.federation.settings import FederationSettings
from common.inference.bundle import SEG_DIR, load_signing_key, preprocessing_from_profile, write_bundle
from common.training.central import IN_CHANNELS_PER_WINDOW, OUT_CHANNELS
from common.training.checkpoint import architecture, build_model, save_checkpoint
from common.training.classification.pretraining import MaskedImageModel
from common.training.classification.settings import ClassifierSettings
from common.training.classification.settings import create_model as create_classifier_model
from common.training.settings import SegmentationSettings
from server.checkpoint import ServerCheckpoints, training_settings
from server.classifier_arms import score_arms, train_arms
from server.discovery import NOT_EVALUATED, discover_sites
from server.grid import Deadlines, StageGrid, collect_replies, error_summary
from server.guard import GuardedStrategy, RunFailed, metrics_reply_problem
from server.strategies import build_strategy


class FederatedRun:
    def __init__(self, grid: Grid, settings: FederationSettings, log=None):
        self.grid = grid
        self.settings = settings
        self.log = log or (lambda text: print(f"hemex: {text}", flush=True))
        self.out = Path(settings.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.profile = load_profile(settings.profile)
        self.checkpoints = ServerCheckpoints(self.out / "checkpoints", training_settings(settings, self.profile))
        overrides = {"model": settings.seg_model} if settings.seg_model else {}
        self.seg = SegmentationSettings.from_profile(self.profile, **overrides)
        self.cls = ClassifierSettings.from_profile(self.profile)
        self.centers: dict[str, int] = {}
        self.declared_cases: dict[str, int] = {}  # per node centre, from its info reply: bounds num-examples
        self.deadlines = Deadlines(settings.round_timeout_s, settings.straggler_factor, settings.straggler_grace_s)
        self.report: dict = {"settings": settings.to_run_config(), "stages": {}, "timing": {}}
        self.steps_done, self.steps_total = 0, self.count_steps()
        self.events: ProgressLog | None = None  # started by the run's first event
        self.cls_initial: ArrayRecord | None = None  # the classifier arms' initial weights (pretrained encoder)

    def count_steps(self) -> int:
        """Units of work announced as `[k/N]` progress lines (rounds, synthesis, evaluations)."""
        s = self.settings
        cls_arms = 1 + ("no-synthesis" in s.arms and s.synthesis != "none")
        alone = any(a in s.arms for a in ("local", "centralized"))
        synth = s.cls_rounds > 0 and s.synthesis != "none"
        baselines = "baselines" in s.arms
        cls = (s.ssl_rounds + s.cls_rounds * cls_arms + alone + baselines + 2) if s.cls_rounds > 0 else 0
        return s.seg_rounds + 1 + synth + cls

    def progress(self, text: str) -> None:
        """One unit of work done: an event in <out-dir>/progress.jsonl, and a log line."""
        self.steps_done += 1
        if self.events is None:
            self.events = ProgressLog(self.out / EVENTS_NAME)
        self.events.emit(self.steps_done, self.steps_total, text)
        self.log(f"[{self.steps_done}/{self.steps_total}] {text}")

    # --------------------------------------------------------------------------------------
    def discover(self) -> dict[str, int]:
        """Map centre ids to node ids (server/discovery.py) and record what each site declared."""
        found = discover_sites(self.grid, self.settings, self.deadlines, self.log)
        self.declared_cases = found.declared_cases
        if found.refused:
            self.report["refused_nodes"] = found.refused
        self.centers = found.centers
        self.report["centers"] = {c: {**found.counts.get(c, {"not_evaluated": NOT_EVALUATED}),
                                      "role": "test" if c in self.settings.test_centers else "train"}
                                  for c in self.settings.centers}
        return self.centers

    @property
    def test_nodes(self) -> dict[str, int]:
        """Held-out centres whose node answered at start-up."""
        return {c: self.centers[c] for c in self.settings.test_centers if c in self.centers}

    def not_evaluated(self) -> dict[str, dict]:
        return {c: {"error": NOT_EVALUATED} for c in self.settings.test_centers if c not in self.centers}

    # --------------------------------------------------------------------------------------
    def seg_architecture(self) -> dict:
        windows = self.profile["preprocess"]["windows"]
        return architecture(self.seg.model, len(windows) * IN_CHANNELS_PER_WINDOW, OUT_CHANNELS,
                            self.seg.model_overrides)

    def train_stage(self, stage: str, initial: ArrayRecord, num_rounds: int, action: str | None = None,
                    config: dict | None = None, attach: dict | None = None) -> ArrayRecord:
        """Run `num_rounds` rounds of `stage` on the training centres, checkpointing each round;
        resume from the last checkpoint when one exists. `action` names the client handler
        (default: the stage), `config` goes to every train and evaluate message, and so do the
        `attach` records."""
        start_round, history = 0, []
        latest = self.checkpoints.latest(stage) if self.settings.resume else None
        if latest is not None:
            start_round, initial, record = latest
            history = record.get("history", [])
            self.log(f"{stage}: resuming after round {start_round} of {num_rounds}")
        if start_round >= num_rounds:
            self.report["stages"][stage] = {"rounds": history, "resumed_after": start_round}
            self.steps_done += num_rounds
            return initial
        self.steps_done += start_round
        train_nodes = {self.centers[c]: c for c in self.settings.train_centers}
        action = action or stage
        stage_grid = StageGrid(self.grid, train_nodes, action, attach, self.deadlines)
        s = self.settings
        strategy = GuardedStrategy(build_strategy(s, len(train_nodes)), train_nodes, self.declared_cases,
                                   s.min_valid_replies, s.max_failed_rounds, s.max_weight_ratio, stage, self.log)

        def round_entry(server_round: int) -> dict:
            entry = {"round": start_round + server_round}
            for kind in ("train", "evaluate"):
                calls = stage_grid.rounds.get(f"{kind}.{action}", [])
                if len(calls) >= server_round:
                    entry[kind] = calls[server_round - 1]
            checks = strategy.rounds.get(server_round, {})
            entry.setdefault("train", {}).update({k: checks[k] for k in ("rejected", "clipped", "failed")
                                                  if checks.get(k)})
            return entry

        def after_round(server_round: int, arrays: ArrayRecord):
            if server_round == 0:
                return None
            entry = round_entry(server_round)
            global_round = entry["round"]
            history.append(entry)
            self.checkpoints.save(stage, global_round, arrays, {"history": history})
            self.progress(f"{stage}: round {global_round}/{num_rounds} done: {summarize_round(entry)}")
            return None

        extra = dict(config or {})
        config = ConfigRecord({"round-offset": start_round, **extra})
        try:
            result = strategy.start(grid=stage_grid, initial_arrays=initial, num_rounds=num_rounds - start_round,
                                    timeout=self.settings.round_timeout_s, train_config=config,
                                    evaluate_config=ConfigRecord({"split": "validation", "round-offset": start_round,
                                                                  **extra}),
                                    evaluate_fn=after_round)
        except RunFailed:
            history.append(round_entry(max(strategy.rounds)))  # the round that stopped the run
            self.report["stages"][stage] = {"rounds": history, "resumed_after": start_round}
            raise
        self.report["stages"][stage] = {"rounds": history, "resumed_after": start_round,
                                        "aggregated_train": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()},
                                        "aggregated_validation": {str(k): dict(v) for k, v in
                                                                  result.evaluate_metrics_clientapp.items()}}
        if num_rounds > 0 and all(entry.get("train", {}).get("failed") for entry in history):
            raise RunFailed(f"{stage}: none of its {num_rounds} round(s) aggregated a valid reply, so its model is "
                            "the initial weights; no model bundle is written")
        return result.arrays if result.arrays else initial  # empty: no round aggregated

    def evaluate_everywhere(self, stage: str, arrays: ArrayRecord) -> dict[str, dict]:
        """Final weights evaluated at every centre: all local cases of held-out centres, the
        validation split of training centres. Only aggregate metrics come back."""
        results = self.not_evaluated()
        train_nodes = {c: self.centers[c] for c in self.settings.train_centers}
        for split, nodes in (("all", self.test_nodes), ("validation", train_nodes)):
            if nodes:
                content = RecordDict({"arrays": arrays, "config": ConfigRecord({"split": split})})
                results.update(self.send(f"evaluate.{stage}", nodes, content))
        return {c: results[c] for c in self.settings.centers}

    # --------------------------------------------------------------------------------------
    def execute(self) -> dict:
        """The whole run; on RunFailed, federation.json records the reason before it is raised."""
        try:
            return self._execute()
        except RunFailed as err:
            self.report["failed"] = str(err)
            write_json(self.out / "federation.json", self.report)
            raise

    def _execute(self) -> dict:
        started = time.time()
        if self.settings.bundle_key:  # a bad key fails now, not after training
            load_signing_key(Path(self.settings.bundle_key))
        if self.settings.resume:
            self.checkpoints.verify()
        else:
            self.checkpoints.clear()
        self.discover()
        self.log(f"centres: train {', '.join(self.settings.train_centers)}; "
                 f"held out {', '.join(self.settings.test_centers) or 'none'}")
        seed_everything(self.settings.seed)
        arch = self.seg_architecture()
        seg_started = time.time()
        seg_arrays = self.train_stage("seg", to_record(build_model(arch).state_dict()), self.settings.seg_rounds)
        self.report["timing"]["seg_seconds"] = time.time() - seg_started
        self.report["stages"].setdefault("seg", {})["final"] = self.evaluate_everywhere("seg", seg_arrays)
        self.progress("seg: final weights evaluated at every centre")
        bundle = self.out / "model"
        # seg-rounds 0 leaves the segmentation untrained: no bundle then (`hemex predict` needs both models).
        trained = self.settings.seg_rounds > 0
        if not trained:
            self.log("seg-rounds is 0: the segmentation model is untrained, so no model bundle is written")
        seg_info = {"seed": self.settings.seed, "train_centers": list(self.settings.train_centers),
                    "rounds": self.settings.seg_rounds, "strategy": self.settings.strategy}
        if trained:  # the segmentation model alone (a run without classifier stops here); the bundle replaces it
            save_checkpoint(bundle / SEG_DIR, seg_arrays.to_torch_state_dict(), arch, seg_info)
        self.report["model_bytes"] = {"seg": seg_arrays.count_bytes()}
        if self.settings.cls_rounds > 0 and self.settings.synthesis != "none":
            synth_started = time.time()
            train_nodes = {c: self.centers[c] for c in self.settings.train_centers}
            results = self.send("query.synth", train_nodes, RecordDict({"config": ConfigRecord({})}))
            self.report["stages"]["synth"] = results
            self.report["timing"]["synth_seconds"] = time.time() - synth_started
            self.progress("synth: " + "; ".join(synth_summary(c, m) for c, m in results.items()))
        if self.settings.cls_rounds > 0 and self.settings.ssl_rounds > 0:
            self.cls_initial = self.pretrain_encoder()
        if self.settings.cls_rounds > 0:
            cls_started = time.time()
            cls_arrays, operating_point = self.classifier(seg_arrays)
            self.report["timing"]["cls_seconds"] = time.time() - cls_started
            self.report["model_bytes"]["cls"] = cls_arrays.count_bytes()
            if trained:
                self.write_bundle(bundle, (seg_arrays.to_torch_state_dict(), arch, seg_info), cls_arrays,
                                  operating_point)
        self.report["timing"]["total_seconds"] = time.time() - started
        self.report["versions"] = {"hemex": __version__, **versions()}
        write_json(self.out / "federation.json", self.report)
        write_json(self.out / "config.json", {"run_config": self.settings.to_run_config(),
                                              "profile": self.profile, "segmentation": self.seg.as_dict(),
                                              "classifier": self.cls.as_dict(), "architecture": arch})
        return self.report

    def pretrain_encoder(self) -> ArrayRecord:
        """Federated self-supervised pretraining of the classifier's encoder (ssl-rounds rounds of
        masked image modelling at the training sites; the model's weights travel, the slices stay).
        Returns the classifier arms' initial weights: the pretrained encoder and its untrained head."""
        windows = self.profile["preprocess"]["windows"]
        mim = MaskedImageModel(create_classifier_model(self.cls, windows), len(windows) + self.cls.mask_channel)
        started = time.time()
        arrays = self.train_stage("ssl", to_record(mim.state_dict()), self.settings.ssl_rounds)
        self.report["timing"]["ssl_seconds"] = time.time() - started
        mim.load_state_dict(arrays.to_torch_state_dict())
        return to_record(mim.classifier.state_dict())

    def write_bundle(self, bundle: Path, segmentation: tuple, cls_arrays: ArrayRecord, operating_point: dict) -> None:
        """The model bundle `hemex predict` loads: both models, the checksummed manifest with the
        preprocessing and provenance, signed with bundle-key when one is set."""
        s = self.settings
        classifier = {"settings": self.cls.as_dict(), "windows": self.profile["preprocess"]["windows"],
                      "calibration": {"method": "platt-binned", "a": operating_point["calib-a"],
                                      "b": operating_point["calib-b"], "n": operating_point["n"]},
                      "threshold": operating_point["threshold"], "train_centers": list(s.train_centers),
                      "rounds": s.cls_rounds, "seed": s.seed}
        provenance = {"profile": self.profile["name"], "centers": list(s.train_centers), "held_out": list(s.test_centers),
                      "seed": s.seed, "seg_rounds": s.seg_rounds, "cls_rounds": s.cls_rounds, "strategy": s.strategy,
                      "synthesis": s.synthesis, "cases": {c: info.get("num-cases") for c, info in
                                                          self.report["centers"].items() if c in s.train_centers}}
        write_bundle(bundle, segmentation, (cls_arrays.to_torch_state_dict(), classifier), provenance,
                     self.bundle_preprocessing(), Path(s.bundle_key) if s.bundle_key else None)
        if not s.bundle_key:
            self.log("the model bundle is unsigned (no bundle-key): sites can check its checksums only")

    def bundle_preprocessing(self) -> dict:
        """The profile's preprocessing record, plus the training sites' slice-spacing range
        (reported by their info replies) for `hemex predict`'s out-of-range warning."""
        pre = preprocessing_from_profile(self.profile)
        low = [self.report["centers"][c].get("slice-mm-min", float("nan")) for c in self.settings.train_centers]
        high = [self.report["centers"][c].get("slice-mm-max", float("nan")) for c in self.settings.train_centers]
        low, high = [v for v in low if math.isfinite(v)], [v for v in high if math.isfinite(v)]
        if low and high:
            pre["slice_thickness_mm"] = [round(min(low), 3), round(max(high), 3)]
        return pre

    def classifier(self, seg_arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        """Train every classifier arm, fix each arm's operating point on the training centres'
        validation histograms, then score all arms together at the held-out centres on ROIs
        from the federated segmentation. Returns the federated arm's weights and operating point."""
        # Classifier ROIs cut on the federated segmentation's masks (cls-masks = segmentation):
        # its weights travel with every classifier message to the training sites.
        attach = {"seg-arrays": seg_arrays} if self.settings.cls_masks == "segmentation" else {}
        return score_arms(self, train_arms(self, attach), seg_arrays, attach)

    def send(self, message_type: str, nodes: dict[str, int], content: RecordDict,
             per_arm: bool = False) -> dict[str, dict]:
        """One message per centre; the replies' aggregate metrics (or the error) per centre. With
        `per_arm`, the "metrics" record plus {"arms": {arm: metrics}} from the "arm.<name>" records."""
        replies = self.exchange({c: Message(content, dst_node_id=n, message_type=message_type)
                                 for c, n in nodes.items()})
        results = {}
        for center, reply in replies.items():
            if isinstance(reply, str):
                results[center] = {"error": reply}
            elif problem := metrics_reply_problem(reply.content, self.declared_cases.get(center)):
                results[center] = {"error": f"reply refused: {problem}"}
                self.log(f"{message_type}: {center}'s reply refused: {problem}")
            elif per_arm:
                results[center] = {**dict(reply.content.metric_records.get("metrics", {})),
                                   "arms": {k[len("arm."):]: dict(r) for k, r in reply.content.metric_records.items()
                                            if k.startswith("arm.")}}
            else:
                results[center] = dict(next(iter(reply.content.metric_records.values())))
        return results

    def exchange(self, messages: dict[str, Message]) -> dict[str, Message | str]:
        """Send keyed messages at once; each key's reply, or the error text (timeouts included)."""
        by_node = {m.metadata.dst_node_id: key for key, m in messages.items()}
        if len(by_node) != len(messages):
            raise RuntimeError("exchange() sends at most one message per node")
        replies, cut_short = collect_replies(self.grid, list(messages.values()), self.deadlines)
        results: dict[str, Message | str] = {key: cut_short or "no reply before the timeout" for key in messages}
        by_message = {m.metadata.message_id: key for key, m in messages.items()}  # set on push
        for reply in replies:  # a dead site's error reply comes from the SuperLink's node id
            key = by_message.get(reply.metadata.reply_to_message_id) or by_node.get(reply.metadata.src_node_id)
            if key is not None:
                results[key] = error_summary(reply.error.reason) if reply.has_error() else reply
        return results


def synth_summary(center: str, m: dict) -> str:
    """One site's synthesis outcome for the progress line."""
    if "error" in m:
        return f"{center}: failed ({m['error'][:80]})"
    if "skipped-he-cases" in m:
        return f"{center}: skipped ({int(m['skipped-he-cases'])} HE case(s) with a mask; a generator needs 2)"
    return (f"{center}: kept {m.get('num-kept', 0)} of {m.get('num-needed', 0)} needed"
            + (" (realism gate failed)" if m.get("realism-passed") == 0 else ""))


def summarize_round(entry: dict) -> str:
    parts = []
    for kind, keys in (("train", ("train-loss",)), ("evaluate", ("dice", "ssl-loss"))):
        metrics = entry.get(kind, {}).get("metrics", {})
        for key in keys:
            if any(key in m for m in metrics.values()):
                parts.append(f"{kind} {key} " + ", ".join(f"{c}={m[key]:.3f}" for c, m in metrics.items() if key in m))
        errors = entry.get(kind, {}).get("errors", {})
        if errors:
            parts.append(f"{kind} errors at {', '.join(errors)}")
        rejected = entry.get(kind, {}).get("rejected", {})
        if rejected:
            parts.append(f"{kind} replies dropped from {', '.join(rejected)}")
        if entry.get(kind, {}).get("failed"):
            parts.append("FAILED, global weights kept")
    return "; ".join(parts) or "no metrics"


