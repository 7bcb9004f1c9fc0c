"""The training loop: epochs, strategy stages, evaluation, checkpoints, exact resume, export.

``train(TrainConfig(...))`` is what ``python -m jaxtl.train`` runs. Order of
work, so that every user error surfaces before anything heavy:

1. validate the options, lock the output folder, check resume/overwrite;
2. read the dataset (bad files found and counted), find the weights;
3. build the model, the device mesh, the loaders;
4. per epoch: the strategy's stage (compiled once per stage; optimizer state
   carried across stages), train, evaluate, plateau, ``metrics.jsonl``, checkpoint;
5. export the final model, plot the curves and the confusion matrix.

Determinism: the data order comes from ``(seed, epoch)``, every random draw
in a step from ``(seed, step, device)``, and a checkpoint records the epoch,
the batch within it and the partial sums of the epoch's metrics. A resumed
run therefore ends with the same parameters and metrics, bit for bit on CPU,
as an uninterrupted one - also in the middle of progressive unfreezing.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxtl.dann import ganin_lambda, init_domain_classifier, make_dann_step
from jaxtl.data.augment import eval_prepare, train_augment
from jaxtl.data.loader import ArrayLoader, Loader
from jaxtl.data.sources import Dataset, load_dataset
from jaxtl.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from jaxtl.export import load_model, save_model
from jaxtl.models import as_dtype, create_model, init_variables
from jaxtl.optim import OptimConfig, carry_over, make_optimizer, plateau_init, plateau_update, schedule_of
from jaxtl.pretrained import load_pretrained, replace_head
from jaxtl.registry import BackboneSpec, resolve
from jaxtl.strategies import (DOMAIN_KEY, Stage, Strategy, all_labels, check_label_tree, label_tree,
                              trainable_mask)
from jaxtl.training.checkpoint import Checkpoints, RunLock
from jaxtl.training.parallel import AXIS, DataParallel
from jaxtl.training.report import (CONFUSION_FILE, CURVES_FILE, MetricsLog, confusion_matrix, epoch_line,
                                   plot_confusion, plot_curves)
from jaxtl.training.state import TrainState, create_train_state
from jaxtl.training.step import head_forward, image_forward, make_eval_step, make_train_step

CONFIG_FILE = "config.json"
BAD_FILES = "skipped_files.txt"


@dataclass
class TrainConfig:
    backbone: str = "mobilenet_v2"
    source: str | None = None
    weights: str = "pretrained"            # "pretrained" or "none" (random init)
    weights_file: str | None = None        # .pth/.safetensors, or a jaxtl model folder
    weights_tag: str | None = None
    data: str = "digits"
    data_dir: str | None = None
    val_fraction: float = 0.2
    limit_per_class: int | None = None
    strict: bool = False
    strategy: Strategy = field(default_factory=Strategy)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None
    img_size: int | None = None
    dtype: str = "float32"
    label_smoothing: float = 0.0
    hflip: bool | None = None              # None: on unless the data says flips change the class (digits)
    color_jitter: float = 0.0
    crop_scale: float = 0.08               # random resized crop: smallest area fraction (torchvision's 0.08)
    seed: int = 0
    output: str = "runs/default"
    resume: bool = False
    cache_features: bool = False
    target_data: str | None = None         # images of another domain: dann trains on them (unlabelled);
                                           # every strategy reports accuracy on their validation split
    domain_weight: float = 1.0             # dann: weight of the domain loss
    dann_separate_bn: bool = False         # dann: per-domain batch statistics in training (two passes)
    mapping: str = "shard_map"
    workers: int = 2
    keep_checkpoints: int = 2
    skip_nonfinite: bool = False
    export: str = "last"                   # "last" or "best"
    allow_download: bool = True
    progress: bool = True

    # Options that may differ between a run and its resumption.
    RESUMABLE_CHANGES = ("output", "resume", "workers", "progress", "allow_download")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["strategy"] = {k: (list(map(list, v)) if k == "unfreeze_at" else v)
                         for k, v in dataclasses.asdict(self.strategy).items()}
        d["optim"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.optim).items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        s = dict(d.pop("strategy"))
        s["unfreeze_at"] = tuple(tuple(x) for x in s.get("unfreeze_at", ()))
        o = dict(d.pop("optim"))
        for k in ("betas", "milestones"):
            if k in o:
                o[k] = tuple(o[k])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(strategy=Strategy(**s), optim=OptimConfig(**o), **{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        """Reject bad option combinations before any heavy work."""
        resolve(self.backbone)  # unknown name -> UnknownModelError with close matches
        as_dtype(self.dtype)
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.cache_features and self.strategy.kind != "feature_extract":
            raise ConfigError(f"--cache-features only works with --strategy feature_extract (the backbone must be "
                              f"frozen for its features to be cached), not {self.strategy.kind}")
        if self.strategy.kind == "dann" and not self.target_data:
            raise ConfigError("--strategy dann needs --target-data (images of the target domain: a folder, "
                              "digits-shifted, digits-inverted or tfds:NAME)")
        if self.domain_weight < 0:
            raise ConfigError(f"--domain-weight must be >= 0, got {self.domain_weight}")
        if self.cache_features and self.color_jitter:
            raise ConfigError("--cache-features computes features once without augmentation; drop --color-jitter")
        if self.weights not in ("pretrained", "none"):
            raise ConfigError(f"--weights must be 'pretrained' or 'none', got {self.weights!r}")
        if self.weights == "none" and self.weights_file:
            raise ConfigError("--weights none (random init) and --weights-file contradict each other")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if self.color_jitter < 0:
            raise ConfigError(f"--color-jitter must be >= 0, got {self.color_jitter}")
        if self.img_size is not None and self.img_size < 16:
            raise ConfigError(f"--img-size must be >= 16, got {self.img_size}")
        if self.export not in ("last", "best"):
            raise ConfigError(f"--export must be 'last' or 'best', got {self.export!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.optim.sched == "plateau" and self.optim.warmup_epochs:
            pass  # warm-up then a constant rate scaled by the plateau factor: fine


@dataclass
class TrainResult:
    output: Path
    records: list[dict]
    state: TrainState
    skipped_files: list[str]
    nonfinite_skipped: int = 0

    @property
    def final(self) -> dict:
        return self.records[-1]


class _Signals:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        cfg.validate()
        self.spec, implied = resolve(cfg.backbone)
        self.source = cfg.source or implied
        self.spec.source(self.source)  # unknown source -> error now
        # The strategy against this backbone's groups (freeze_until, unfreeze_at, lr_mults): refused
        # before the output folder is created or any data is read.
        self.stages = cfg.strategy.stages(self.spec, cfg.epochs)
        self.lr_mults = cfg.strategy.lr_multipliers(self.spec)
        self.out = Path(cfg.output)
        self.skipped: list[str] = []  # "path: reason" of every file skipped as unreadable
        self.lock = RunLock(self.out).acquire()
        try:
            self._setup()
        except BaseException:
            self.lock.release()
            raise

    # -- set-up --------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.cfg
        self.ckpts = Checkpoints(self.out / "checkpoints", keep=cfg.keep_checkpoints)
        has_run = self.ckpts.latest_step() is not None
        if has_run and not cfg.resume:
            raise CheckpointError(f"{self.out} already holds a run (checkpoint step {self.ckpts.latest_step()}); "
                                  "pass --resume to continue it, or choose another --output")
        if cfg.resume and not has_run:
            raise CheckpointError(f"--resume: no checkpoint in {self.out / 'checkpoints'}; start without --resume")
        if cfg.resume:
            self._check_resume_config()

        self.dp = DataParallel(cfg.mapping)
        self.dp.check_batch_size(cfg.batch_size)
        self.eval_batch_size = cfg.eval_batch_size or cfg.batch_size
        self.dp.check_batch_size(self.eval_batch_size, "--eval-batch-size")

        t0 = time.perf_counter()
        self.data: Dataset = load_dataset(cfg.data, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                                          seed=cfg.seed, limit_per_class=cfg.limit_per_class, strict=cfg.strict)
        if cfg.resume:
            (self.out / BAD_FILES).unlink(missing_ok=True)  # rewritten from the scan below
        if self.data.skipped:
            self.log(f"skipping {len(self.data.skipped)} file(s) that are not readable images "
                     f"(listed in {self.out / BAD_FILES}): {self.data.skipped[0]}"
                     + (" ..." if len(self.data.skipped) > 1 else ""))
            self._record_bad(self.data.skipped)
        self.num_classes = self.data.num_classes
        self.log(f"data {self.data.name}: {len(self.data.train)} training / {len(self.data.val)} validation "
                 f"images, {self.num_classes} classes [{time.perf_counter() - t0:.1f} s]")
        self.target: Dataset | None = None
        self.adversarial = cfg.strategy.kind == "dann"
        if cfg.target_data:
            self.target = load_dataset(cfg.target_data, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                                       seed=cfg.seed, strict=cfg.strict)
            if self.target.skipped:
                self._record_bad(self.target.skipped)
            # The target's labels only serve evaluation, and only if its classes are the source's.
            self.target_labelled = self.target.class_names == self.data.class_names
            self.log(f"target domain {self.target.name}: "
                     + (f"{len(self.target.train)} unlabelled training images, " if self.adversarial else "")
                     + (f"{len(self.target.val)} labelled validation images" if self.target_labelled else
                        "its classes differ from the source's: no target accuracy"))

        self._load_weights()
        self.model = create_model(self.spec.name, self.num_classes, source=self.source, dtype=cfg.dtype,
                                  axis_name=AXIS, **self.model_kwargs)
        if self.adversarial:
            self.variables["params"][DOMAIN_KEY] = init_domain_classifier(self._num_features(), cfg.seed)
        hflip = self.data.flip_invariant if cfg.hflip is None else cfg.hflip
        jitter = (cfg.color_jitter, cfg.color_jitter, cfg.color_jitter, min(cfg.color_jitter / 2, 0.5))
        self.prepare_train = partial(train_augment, pre=self.pre, hflip=hflip, jitter=jitter,
                                     scale=(cfg.crop_scale, 1.0))
        self.prepare_eval = partial(eval_prepare, pre=self.pre)
        self._compiled: dict[int, tuple] = {}

        loader_kw = dict(workers=cfg.workers, process_index=jax.process_index(), process_count=jax.process_count(),
                         put=self.dp.put_batch)
        # DANN merges source and target batches before they go to the devices.
        train_kw = {**loader_kw, "put": None} if self.adversarial else loader_kw
        self.train_loader = Loader(self.data.train, self.pre, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
                                   **train_kw)
        self.val_loader = Loader(self.data.val, self.pre, batch_size=self.eval_batch_size, train=False, **loader_kw)
        self.target_loader = self.target_val_loader = None
        if self.target is not None:
            if self.adversarial:
                self.target_loader = Loader(self.target.train, self.pre, batch_size=cfg.batch_size, train=True,
                                            seed=cfg.seed + 1, **train_kw)
            if self.target_labelled:
                self.target_val_loader = Loader(self.target.val, self.pre, batch_size=self.eval_batch_size,
                                                train=False, **loader_kw)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.cache_features:
            self._cache_features(loader_kw)
        if not cfg.resume:  # only once data and weights are known to work
            (self.out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    def _check_resume_config(self) -> None:
        path = self.out / CONFIG_FILE
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"--resume: {path} is missing or unreadable; cannot tell how this run was "
                                  "started") from None
        now = self.cfg.to_dict()
        diffs = [f"{k}: run {saved.get(k)!r}, now {now[k]!r}" for k in now
                 if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != now[k]]
        if diffs:
            raise ConfigError(f"--resume with different options than the run in {self.out} ({'; '.join(diffs[:3])}); "
                              "pass the same options (or only --resume --output DIR)")

    def _record_bad(self, lines: list[str]) -> None:
        self.skipped += lines
        with open(self.out / BAD_FILES, "a") as fh:
            fh.write("".join(line + "\n" for line in lines))

    def _load_weights(self) -> None:
        cfg, spec = self.cfg, self.spec
        self.model_kwargs = {"img_size": cfg.img_size} if cfg.img_size and _has_img_size(spec) else {}
        self.origin: dict[str, Any] = {}
        if cfg.weights == "none":
            model = create_model(spec.name, self.num_classes, source=self.source, **self.model_kwargs)
            self.variables = init_variables(model, spec, cfg.seed)
            pre = spec.preprocessing_for(self.source)
            self.origin = {"weights": "random init"}
        elif cfg.weights_file and Path(cfg.weights_file).is_dir():
            _, variables, meta = load_model(cfg.weights_file)
            if meta["backbone"] != spec.name:
                raise ConfigError(f"--weights-file {cfg.weights_file} holds a {meta['backbone']}, not {spec.name}")
            if int(meta["num_classes"]) != self.num_classes:
                variables = replace_head(variables, spec.head_path, self.num_classes, cfg.seed)
            self.variables, pre = variables, _preprocessing(meta)
            self.model_kwargs = {**meta.get("model_kwargs", {}), **self.model_kwargs}
            self.origin = {"weights": str(cfg.weights_file)}
        else:
            _, variables, info = load_pretrained(spec.name, self.source, tag=cfg.weights_tag,
                                                 weights_file=cfg.weights_file, allow_download=cfg.allow_download,
                                                 **self.model_kwargs)
            # Transfer learning: the head is always new, sized by the data.
            self.variables = replace_head(variables, spec.head_path, self.num_classes, cfg.seed)
            pre = info.preprocessing
            self.origin = info.to_meta()["weights"]
            self.log(f"weights: {spec.name} {info.source} {info.tag or ''} ({Path(info.file).name}, "
                     f"sha256 {info.sha256[:8]}); new {self.num_classes}-class head")
        self.pre = pre.at_size(cfg.img_size) if cfg.img_size else pre

    def _num_features(self) -> int:
        """Width of the pooled features (what the head and DANN's domain classifier see)."""
        size = self.pre.input_size
        shape = jax.eval_shape(lambda v: self.model.apply(v, np.zeros((1, size, size, 3), np.float32),
                                                          features_only=True), self.variables)
        return int(shape.shape[-1])

    # -- compiled steps per stage -------------------------------------------------------------

    def stage_for(self, epoch: int) -> Stage:
        for stage in self.stages:
            if stage.start_epoch <= epoch < stage.end_epoch:
                return stage
        return self.stages[-1]

    def compiled(self, stage: Stage):
        """(labels, tx, mapped train step) of a stage, built once."""
        if stage.index not in self._compiled:
            labels = label_tree(self.spec, self.variables["params"], stage.frozen)
            check_label_tree(labels, self.variables["params"])
            tx = make_optimizer(self.cfg.optim, labels, self.lr_mults, all_labels(self.spec), self.steps_per_epoch,
                                self.cfg.epochs)
            drop_rate = float(getattr(self.model, "drop_rate", 0.0) or 0.0)
            if self.adversarial:
                step = make_dann_step(self.model, tx, frozen=stage.frozen, trainable=trainable_mask(labels),
                                      head_path=self.spec.head_path, num_classes=self.num_classes,
                                      prepare=self.prepare_train, total_steps=self.steps_per_epoch * self.cfg.epochs,
                                      domain_weight=self.cfg.domain_weight, drop_rate=drop_rate,
                                      separate_bn=self.cfg.dann_separate_bn,
                                      label_smoothing=self.cfg.label_smoothing, axis_name=AXIS)
            else:
                if self.cfg.cache_features:
                    forward = head_forward(self.spec.head_path, drop_rate)
                else:
                    forward = image_forward(self.model, frozen=stage.frozen, prepare=self.prepare_train)
                step = make_train_step(forward, tx, trainable=trainable_mask(labels), num_classes=self.num_classes,
                                       label_smoothing=self.cfg.label_smoothing, axis_name=AXIS)
            self._compiled[stage.index] = (labels, tx, self.dp.train_step(step))
        return self._compiled[stage.index]

    def _eval_fn(self):
        if not hasattr(self, "_eval"):
            if self.cfg.cache_features:
                head = head_forward(self.spec.head_path)
                apply_logits = lambda v, feats: head(v["params"], None, feats, None)[0]  # noqa: E731
            else:
                model, prepare = self.model, self.prepare_eval
                apply_logits = lambda v, images: model.apply(v, prepare(images), train=False)  # noqa: E731
            self._eval = self.dp.eval_step(make_eval_step(apply_logits, num_classes=self.num_classes,
                                                          axis_name=AXIS))
        return self._eval

    # -- feature cache ------------------------------------------------------------------

    def _cache_features(self, loader_kw: dict) -> None:
        """Run the frozen backbone once over train and val (no augmentation)."""
        model, prepare = self.model, self.prepare_eval
        features = self.dp.map_batch_fn(
            lambda v, batch: model.apply(v, prepare(batch["image"]), train=False, features_only=True))
        variables = self.dp.replicate(self.variables)
        cached = {}
        for split, source in (("train", self.data.train), ("val", self.data.val)):
            t0 = time.perf_counter()
            loader = Loader(source, self.pre, batch_size=self.eval_batch_size, train=False, **loader_kw)
            feats, labels, weight = [], [], []
            for batch in loader.epoch(0):
                feats.append(self.dp.unshard_per_example(features(variables, batch)))
                labels.append(self.dp.unshard_per_example(batch["label"]))
                weight.append(self.dp.unshard_per_example(batch["weight"]))
            n = len(source)
            cached[split] = (np.concatenate(feats)[:n].astype(np.float32), np.concatenate(labels)[:n],
                             np.concatenate(weight)[:n])
            self._note_bad(loader)
            self.log(f"cached {split} features: {n} x {cached[split][0].shape[1]} "
                     f"[{time.perf_counter() - t0:.1f} s, {n / max(time.perf_counter() - t0, 1e-9):.0f} images/s]")
        kw = dict(process_index=jax.process_index(), process_count=jax.process_count(), put=self.dp.put_batch)
        self.train_loader = ArrayLoader(*cached["train"], batch_size=self.cfg.batch_size, train=True,
                                        seed=self.cfg.seed, **kw)
        self.val_loader = ArrayLoader(*cached["val"], batch_size=self.eval_batch_size, train=False, **kw)

    def _note_bad(self, loader) -> None:
        """Files that failed to decode while loading (they passed the header check)."""
        known = {line.split(": ", 1)[0] for line in self.skipped}
        new = [f"{p}: {r}" for p, r in getattr(loader, "bad", {}).items() if p not in known]
        if new:
            self._record_bad(new)
            self.log(f"skipped {len(new)} unreadable file(s) while loading: {new[0]}")

    # -- the run ------------------------------------------------------------------------

    def initial_state(self, stage: Stage) -> TrainState:
        return self.dp.replicate(self._new_state(self.variables, stage))

    def abstract_state(self, stage: Stage) -> TrainState:
        """Shapes, dtypes and shardings of ``stage``'s train state, the target a checkpoint restores
        into. No arrays are made or read: after the first step the initial variables' buffers belong
        to the train step (donated), so building a real state then failed ("Array has been deleted")."""
        return self.dp.abstract_replicated(jax.eval_shape(lambda v: self._new_state(v, stage), self.variables))

    def _new_state(self, variables, stage: Stage) -> TrainState:
        _, tx, _ = self.compiled(stage)
        return create_train_state(variables, tx, self.cfg.seed, plateau_init(self.cfg.optim))

    def evaluate(self, state: TrainState, loader=None) -> dict:
        """Loss, top-1, top-5 and predictions on a validation loader (default: the source's)."""
        loader = loader or self.val_loader
        evaluate = self._eval_fn()
        params = {k: v for k, v in state.params.items() if k != DOMAIN_KEY}
        variables = {"params": params, "batch_stats": state.batch_stats}
        sums = {"loss_sum": 0.0, "correct": 0.0, "correct_topk": 0.0, "count": 0.0}
        preds = []
        for batch in loader.epoch(0):
            out = evaluate(variables, batch)
            for k in sums:
                sums[k] += float(out[k])
            preds.append(self.dp.unshard_per_example(out["pred"]))
        self._note_bad(loader)
        n = loader.n
        pred = np.concatenate(preds)[:n]
        count = max(sums["count"], 1.0)
        return {"val_loss": sums["loss_sum"] / count, "val_top1": sums["correct"] / count,
                "val_top5": sums["correct_topk"] / count, "val_count": int(sums["count"]), "pred": pred}

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            self.ckpts.close()
            self.lock.release()

    def _run(self) -> TrainResult:
        cfg, log = self.cfg, self.log
        metrics_log = MetricsLog(self.out)
        start_epoch, start_batch, partial_sums, nonfinite = 0, 0, None, 0
        stage = self.stage_for(0)
        if cfg.resume:
            step = self.ckpts.latest_step()
            # The record says which stage's optimizer structure the state has.
            record = self.ckpts.record(step)
            stage = self.stages[int(record["stage"])]
            state, record = self.ckpts.restore(step, self.abstract_state(stage), record)
            start_epoch, start_batch = int(record["epoch"]), int(record["batch"])
            partial_sums, nonfinite = record.get("partial"), int(record.get("nonfinite_skipped", 0))
            records = metrics_log.keep_before(start_epoch)
            log(f"resumed from step {step}: epoch {start_epoch + 1}, batch {start_batch}")
        else:
            state = self.initial_state(stage)
            records = []
            metrics_log.path.write_text("")
        log(f"{cfg.strategy.kind}: {len(self.stages)} stage(s); stage {stage.index} trains "
            f"{', '.join(stage.trainable)}; {self.dp.num_devices} device(s), {self.dp.mapping}; "
            f"{self.steps_per_epoch} steps/epoch")

        schedule = schedule_of(cfg.optim, self.steps_per_epoch, cfg.epochs)
        signals = _Signals()
        last_eval = None
        with signals:
            for epoch in range(start_epoch, cfg.epochs):
                new_stage = self.stage_for(epoch)
                if new_stage.index != stage.index:
                    old_labels = self.compiled(stage)[0]
                    labels, tx, _ = self.compiled(new_stage)
                    state = state.replace(opt_state=carry_over(state.opt_state, tx.init(state.params),
                                                               old_labels, labels))
                    log(f"stage {new_stage.index}: now training {', '.join(new_stage.trainable)}")
                    stage = new_stage
                _, _, train_step = self.compiled(stage)
                t0 = time.perf_counter()
                sums = dict(partial_sums or self._zero_sums())
                first = start_batch if epoch == start_epoch else 0
                state, sums, nonfinite, stopped_at = self._train_epoch(state, train_step, epoch, first, sums,
                                                                       nonfinite, signals)
                partial_sums = None
                if stopped_at is not None:
                    self._save(state, epoch, stopped_at, stage, sums, nonfinite, None)
                    raise Interrupted(
                        f"interrupted at epoch {epoch + 1}, batch {stopped_at}; checkpoint saved (step "
                        f"{int(state.step)}) in {self.out}; continue with: python -m jaxtl.train --resume "
                        f"--output {self.out}")
                last_eval = self.evaluate(state)
                if cfg.optim.sched == "plateau":
                    state = state.replace(plateau=self.dp.replicate(
                        plateau_update(cfg.optim, jax.device_get(state.plateau), last_eval["val_loss"])))
                opt_steps = int(state.step) // cfg.optim.accum_steps
                count = max(sums["count"], 1.0)
                record = {
                    "epoch": epoch, "strategy_stage": stage.index, "trainable_groups": list(stage.trainable),
                    "train_loss": sums["loss_sum"] / count, "train_top1": sums["correct"] / count,
                    "val_loss": last_eval["val_loss"], "val_top1": last_eval["val_top1"],
                    "val_top5": last_eval["val_top5"],
                    "lr": float(schedule(opt_steps)) * float(jax.device_get(state.plateau.scale)),
                    "seconds": time.perf_counter() - t0, "step": int(state.step),
                }
                if self.adversarial:
                    dcount = max(sums["domain_count"], 1.0)
                    record.update(domain_loss=sums["domain_loss_sum"] / dcount,
                                  domain_acc=sums["domain_correct"] / dcount,
                                  dann_lambda=float(ganin_lambda(int(state.step) / (self.steps_per_epoch
                                                                                   * cfg.epochs))))
                if self.target_val_loader is not None:
                    target_eval = self.evaluate(state, self.target_val_loader)
                    record.update(target_val_loss=target_eval["val_loss"], target_val_top1=target_eval["val_top1"],
                                  target_val_top5=target_eval["val_top5"])
                if nonfinite:
                    record["nonfinite_skipped"] = nonfinite
                records.append(record)
                metrics_log.append(record)
                log(epoch_line(record, cfg.epochs))
                self._save(state, epoch + 1, 0, stage, None, nonfinite, {"val_top1": record["val_top1"]})
        return self._finish(state, records, last_eval, nonfinite)

    def _train_epoch(self, state, train_step, epoch, first_batch, sums, nonfinite, signals):
        """Train one epoch; returns (state, sums, nonfinite, batch index if interrupted else None)."""
        cfg = self.cfg
        bar = _progress(cfg.progress, total=self.steps_per_epoch, initial=first_batch,
                        desc=f"epoch {epoch + 1}/{cfg.epochs}")
        pending = None  # metrics of the previous step, read one step late to keep the device busy
        images = 0
        t0 = time.perf_counter()
        batch_index = first_batch

        def consume(item):
            nonlocal nonfinite, images
            m, b = item
            m = jax.device_get(m)
            if not bool(m["finite"]):
                step_no = epoch * self.steps_per_epoch + b
                if not cfg.skip_nonfinite:
                    raise TrainingError(
                        f"non-finite loss or gradient at epoch {epoch + 1}, batch {b} (step {step_no}); stopped. "
                        f"The last good checkpoint is in {self.out / 'checkpoints'}; lower --lr, add --clip-grad, "
                        "or pass --skip-nonfinite")
                nonfinite += 1
                return
            for k in sums:
                sums[k] += float(m[k])
            images += int(m["count"])
            if bar is not None:
                bar.set_postfix(loss=f"{sums['loss_sum'] / max(sums['count'], 1):.4f}",
                                img_s=f"{images / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
                bar.update(1)

        try:
            for batch in self._batches(epoch, first_batch):
                state, metrics = train_step(state, batch)
                if pending is not None:
                    consume(pending)
                pending = (metrics, batch_index)
                batch_index += 1
                if signals.received is not None:
                    break
            if pending is not None:
                consume(pending)
        finally:
            if bar is not None:
                bar.close()
        self._note_bad(self.train_loader)
        if signals.received is not None and batch_index < self.steps_per_epoch:
            return state, sums, nonfinite, batch_index
        return state, sums, nonfinite, None

    def _batches(self, epoch: int, first: int):
        if self.target_loader is None:
            yield from self.train_loader.epoch(epoch, first)
            return
        # The target batch of global step s is fixed by s alone, so a resumed run sees the same pairs.
        target = self._target_stream(epoch * self.steps_per_epoch + first)
        try:
            for batch in self.train_loader.epoch(epoch, first):
                t = next(target)
                yield self.dp.put_batch({**batch, "target_image": t["image"], "target_weight": t["weight"]})
        finally:
            target.close()

    def _target_stream(self, step: int):
        e, b = divmod(step, len(self.target_loader))
        while True:
            yield from self.target_loader.epoch(e, b)
            e, b = e + 1, 0

    def _zero_sums(self) -> dict:
        sums = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        if self.adversarial:
            sums.update(domain_loss_sum=0.0, domain_correct=0.0, domain_count=0.0)
        return sums

    def _save(self, state, epoch: int, batch: int, stage: Stage, partial_sums, nonfinite: int, metrics) -> None:
        record = {"epoch": epoch, "batch": batch, "stage": stage.index, "partial": partial_sums,
                  "nonfinite_skipped": nonfinite}
        self.ckpts.save(int(state.step), state, record, metrics)

    def _finish(self, state, records, last_eval, nonfinite) -> TrainResult:
        cfg = self.cfg
        export_state = state
        if cfg.export == "best" and self.ckpts.best_step() not in (None, int(state.step)):
            best = self.ckpts.best_step()
            record = self.ckpts.record(best)
            export_state, _ = self.ckpts.restore(best, self.abstract_state(self.stages[int(record["stage"])]), record)
        final = records[-1] if records else {}
        params = {k: v for k, v in export_state.params.items() if k != DOMAIN_KEY}  # DANN's adversary stays behind
        variables = jax.device_get({"params": params, "batch_stats": export_state.batch_stats})
        meta = {
            "backbone": self.spec.name, "source": self.source, "num_classes": self.num_classes,
            "class_names": self.data.class_names, "preprocessing": self.pre.to_dict(),
            "model_kwargs": self.model_kwargs, "weights": self.origin,
            "training": {"data": cfg.data, "strategy": cfg.strategy.kind, "epochs": cfg.epochs,
                         "exported": cfg.export, "val_top1": final.get("val_top1"),
                         "best_val_top1": max((r["val_top1"] for r in records), default=None),
                         "target_val_top1": final.get("target_val_top1"), "seed": cfg.seed},
        }
        path = save_model(self.out, variables, meta)
        if records:
            plot_curves(records, self.out / CURVES_FILE, f"{self.spec.name} · {cfg.strategy.kind} · {cfg.data}")
        if last_eval is not None:
            labels = (self.val_loader.labels if isinstance(self.val_loader, ArrayLoader) else self.data.val.labels)
            cm = confusion_matrix(labels[:len(last_eval["pred"])], last_eval["pred"], self.num_classes)
            plot_confusion(cm, self.data.class_names, self.out / CONFUSION_FILE)
        if self.skipped:
            self.log(f"{len(self.skipped)} file(s) were skipped as unreadable; see {self.out / BAD_FILES}")
        if nonfinite:
            self.log(f"{nonfinite} step(s) with a non-finite loss were skipped (--skip-nonfinite)")
        self.log(f"exported the {cfg.export} model to {path}; curves in {self.out / CURVES_FILE}")
        return TrainResult(self.out, records, state, list(self.skipped), nonfinite)


def _has_img_size(spec: BackboneSpec) -> bool:
    import inspect

    ctor = spec.constructor
    target = getattr(ctor, "func", ctor)
    try:
        return "img_size" in inspect.signature(target).parameters or any(
            f.name == "img_size" for f in dataclasses.fields(target))
    except (TypeError, ValueError):
        return False


def _preprocessing(meta: dict):
    from jaxtl.registry import Preprocessing

    return Preprocessing.from_dict(meta["preprocessing"])


def _progress(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="batch", leave=False, dynamic_ncols=True, mininterval=0.5, file=sys.stderr, **kw)


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Run a training job (see :class:`TrainConfig`); returns the per-epoch records and the final state."""
    return Trainer(cfg, log).run()


__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "Interrupted"]
