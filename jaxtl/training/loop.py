"""The training loop: epochs, strategy stages, evaluation, checkpoints, exact resume, export.

``train(TrainConfig(...))`` (``jaxtl.train``) is what ``python -m jaxtl.train`` runs. Order of
work, so that every user error surfaces before anything heavy:

1. validate the options, lock the output folder, check resume/overwrite;
2. read the dataset (bad files found and counted), find the weights;
3. build the model, the device mesh, the loaders;
4. per epoch: the strategy's stage (compiled once per stage; optimizer state
   carried across stages), train, evaluate, plateau, ``metrics.jsonl``, checkpoint;
5. export the final model, plot the curves and the confusion matrix.

What trains and what is frozen are separate: the train state holds the
trainable groups' parameters, their optimizer state and the statistics that
change; the frozen groups' variables are constants of the compiled step (no
gradient, update, donation or copy) and are not written to checkpoints, which
reference the weights file they come from instead. A group unfrozen at a stage
boundary joins the state with its starting values. On cached features an epoch
is one compiled call (the steps scanned on the device), and so is evaluation.

Determinism: the data order comes from ``(seed, epoch)``, every random draw
in a step from ``(seed, step, the example's position in the global batch)`` -
the same on any number of devices or processes - and a checkpoint records the epoch,
the batch within it and the partial sums of the epoch's metrics. A resumed
run therefore ends with the same parameters and metrics, bit for bit on CPU,
as an uninterrupted one - also in the middle of progressive unfreezing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import runtime
from jaxtl.calibration import fit_on_source
from jaxtl.data.augment import eval_prepare, train_augment
from jaxtl.data.autoaugment import auto_augment, mean_fill, random_erasing
from jaxtl.data.loader import ArrayLoader, Loader
from jaxtl.data.sources import Dataset, load_dataset
from jaxtl.errors import CheckpointError, ConfigError, Interrupted, JaxtlError, ProcessLost, TrainingError
from jaxtl.export import save_model, write_variables_file
from jaxtl.lora import LORA_KEY, apply_factors, init_factors, merge_factors, select_targets
from jaxtl.models import create_model
from jaxtl.optim import carry_over, make_optimizer, plateau_init, plateau_update, schedule_of
from jaxtl.registry import resolve
from jaxtl.strategies import (NO_DECAY_SUFFIX, Stage, all_labels, check_label_tree, label_tree, split_variables,
                              stage_at, trainable_labels)
from jaxtl.training.config import CONFIG_FILE, TrainConfig
from jaxtl.training.evaluation import accumulate, metrics
from jaxtl.training.feature_cache import cache_features
from jaxtl.training.objectives import make_objective
from jaxtl.training.checkpoint import STATE_LAYOUT_KEY, STATE_TRAINABLE, Checkpoints, RunLock
from jaxtl.training.parallel import AXIS, DataParallel, lost_process
from jaxtl.training.report import (CONFUSION_FILE, CURVES_FILE, MetricsLog, confusion_matrix, epoch_line,
                                   plot_confusion, plot_curves)
from jaxtl.training.start import starting_point
from jaxtl.training.state import TrainState, create_train_state, merge
from jaxtl.training.step import (L2SP_REFERENCE, head_forward, head_params, make_eval_step, map_eval, pack_metrics,
                                 scan_steps, unpack_metrics)
from jaxtl.wise_ft import interpolate
from jaxtl.weights import sha256_file

BAD_FILES = "skipped_files.txt"


@dataclass
class TrainResult:
    output: Path
    records: list[dict]
    state: TrainState                 # the last train state: what trained (see jaxtl.training.state)
    skipped_files: list[str]
    nonfinite_skipped: int = 0
    variables: dict | None = None     # the exported model's variables (host arrays), frozen layers included

    @property
    def final(self) -> dict:
        return self.records[-1]


class _Signals:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step (or epoch, on cached
    features, or with several processes); a second one stops at once, except during a checkpoint save (:meth:`saving`), which
    always completes: the loop then stops right after it, the new checkpoint on disk."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}
        self._saving = False

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and not self._saving:  # a second signal: give up immediately
            raise KeyboardInterrupt
        self.received = self.received or signum

    @contextmanager
    def saving(self):
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        cfg = cfg.with_absolute_paths()
        cfg.validate()
        # With several processes, process 0 holds the folder's lock, writes its files and speaks for the run;
        # all of them train, and save and restore checkpoints together.
        self.primary = jax.process_index() == 0
        self.cfg, self.log = cfg, (log if self.primary else _quiet)
        if jax.process_count() > 1:
            _check_same_options(cfg)
        self.spec, implied = resolve(cfg.backbone)
        self.source = cfg.source or implied
        self.spec.source(self.source)  # unknown source -> error now
        # The strategy against this backbone's groups (freeze_until, unfreeze_at, lr_mults): refused
        # before the output folder is created or any data is read.
        self.stages = cfg.strategy.stages(self.spec, cfg.epochs)
        self.lr_mults = cfg.strategy.lr_multipliers(self.spec)
        self.out = Path(cfg.output)
        self.skipped: list[str] = []  # "path: reason" of every file skipped as unreadable
        self.extended_from = cfg.epochs  # a resumed run's epochs before this start
        before = {p for p in (self.out, self.out / ".lock", self.out / "checkpoints") if p.exists()}
        self.lock = RunLock(self.out).acquire() if self.primary else None
        try:
            self._setup()
        except BaseException:
            if hasattr(self, "ckpts"):
                self.ckpts.close()
            if self.lock is not None:
                self.lock.release()
                _remove_what_this_start_made(self.out, before)
            raise

    # -- set-up --------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.cfg
        self.ckpts = Checkpoints(self.out / "checkpoints", keep=cfg.keep_checkpoints, best_metric=cfg.best_metric)
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
        if cfg.mix.enabled and (cfg.batch_size // self.dp.num_devices) % 2:
            raise ConfigError(f"--mixup/--cutmix mix neighbouring examples within a device: the batch per device "
                              f"({cfg.batch_size // self.dp.num_devices}) must be even; change --batch-size")
        self.eval_batch_size = cfg.eval_batch_size or cfg.batch_size
        self.dp.check_batch_size(self.eval_batch_size, "--eval-batch-size")

        t0 = time.perf_counter()
        self.data: Dataset = load_dataset(cfg.data, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                                          seed=cfg.seed, limit_per_class=cfg.limit_per_class, strict=cfg.strict)
        if cfg.resume and self.primary:
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
        self.objective = make_objective(cfg)
        if cfg.target_data:
            self.target = load_dataset(cfg.target_data, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
                                       seed=cfg.seed, strict=cfg.strict)
            if self.target.skipped:
                self._record_bad(self.target.skipped)
            # The target's labels only serve evaluation, and only if its classes are the source's.
            self.target_labelled = self.target.class_names == self.data.class_names
            self.log(f"target domain {self.target.name}: "
                     + (f"{len(self.target.train)} unlabelled training images, "
                        if self.objective.trains_on_target else "")
                     + (f"{len(self.target.val)} labelled validation images" if self.target_labelled else
                        "its classes differ from the source's: no target accuracy"))

        start = starting_point(cfg, self.spec, self.source, self.num_classes, self.out,
                               resume_needs_frozen=self._resume_needs_frozen, log=self.log)
        self.variables, self.pre, self.model_kwargs = start.variables, start.preprocessing, start.model_kwargs
        self.origin, self.frozen_ref = start.origin, start.frozen_ref
        self.model = create_model(self.spec.name, self.num_classes, source=self.source, dtype=cfg.dtype,
                                  axis_name=AXIS, **self.model_kwargs)
        if self.objective.extra_keys:  # the objective's own parameters, beside the backbone's
            self.variables["params"].update(self.objective.init_params(self._num_features(), cfg.seed))
        # Parameters beside the backbone's, under top-level keys of their own: they always train.
        self.extra_keys = tuple(self.objective.extra_keys)
        self.reparam = None
        if cfg.strategy.kind == "lora":
            self._add_lora()
        self.head_drop_rate = float(getattr(self.model, "drop_rate", 0.0) or 0.0)
        hflip = self.data.flip_invariant if cfg.hflip is None else cfg.hflip
        self.hflip = hflip  # the exported model says whether it trained on flips (test-time flips follow it)
        jitter = (cfg.color_jitter, cfg.color_jitter, cfg.color_jitter, min(cfg.color_jitter / 2, 0.5))
        auto = erase = None
        if cfg.aa is not None:  # RandAugment fills with the mean colour, TrivialAugment with black (as torchvision)
            policy = cfg.auto_augment
            auto = partial(auto_augment, aa=policy, fill=mean_fill(self.pre.mean) if policy.kind == "rand" else None)
        if cfg.reprob > 0:
            erase = partial(random_erasing, prob=cfg.reprob)
        self.prepare_train = partial(train_augment, pre=self.pre, hflip=hflip, jitter=jitter,
                                     scale=(cfg.crop_scale, 1.0), auto=auto, erase=erase)
        self.prepare_eval = partial(eval_prepare, pre=self.pre)
        self._compiled: dict[int, _StageSteps] = {}
        self._placed: dict[int, Any] = {}  # evaluation batches of cached features, on the devices
        self._stepped: set[int] = set()  # stages whose train step has run (compiled)
        self.metric_names = self.objective.metric_names

        counts = np.bincount(np.asarray(self.data.train.labels), minlength=self.num_classes)
        # sklearn's "balanced": n / (classes x n_class); a class without examples gets weight 0.
        self.class_weights = (np.where(counts > 0, counts.sum() / (self.num_classes * np.maximum(counts, 1)), 0.0)
                              .astype(np.float32) if cfg.class_weights == "balanced" else None)
        if cfg.class_weights or cfg.balanced_sampler:
            self.log(f"class imbalance: training images per class from {counts.min()} to {counts.max()}"
                     + ("; balanced loss weights" if cfg.class_weights else "")
                     + ("; sampling by inverse frequency" if cfg.balanced_sampler else ""))
        loader_kw = dict(workers=cfg.workers, process_index=jax.process_index(), process_count=jax.process_count(),
                         put=self.dp.put_batch)
        # An objective that trains on the target merges source and target batches before they go to the devices.
        train_kw = {**loader_kw, "put": None} if self.objective.trains_on_target else loader_kw
        self.train_loader = Loader(self.data.train, self.pre, batch_size=cfg.batch_size, train=True, seed=cfg.seed,
                                   sample_weights=self._sample_weights(self.data.train.labels), **train_kw)
        self.val_loader = Loader(self.data.val, self.pre, batch_size=self.eval_batch_size, train=False, **loader_kw)
        self.target_loader = self.target_val_loader = None
        if self.target is not None:
            if self.objective.trains_on_target:
                self.target_loader = Loader(self.target.train, self.pre, batch_size=cfg.batch_size, train=True,
                                            seed=cfg.seed + 1, **train_kw)
            if self.target_labelled:
                self.target_val_loader = Loader(self.target.val, self.pre, batch_size=self.eval_batch_size,
                                                train=False, **loader_kw)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.cache_features:
            self._cache_features(loader_kw)
        if cfg.weights == "none" and any(stage.frozen for stage in self.stages):
            if cfg.resume:
                path = Path(self.frozen_ref["file"])
                self.frozen_ref["sha256"] = sha256_file(path) if path.is_file() else None
            elif self.primary:  # the record that names the file is process 0's too
                self._write_initial_variables()
        if not cfg.resume or cfg.epochs != self.extended_from:  # only once data and weights are known to work
            if cfg.resume:
                self.log(f"extending the run in {self.out} from {self.extended_from} to {cfg.epochs} epochs")
            if self.primary:
                _write_atomically(self.out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")

    def _add_lora(self) -> None:
        """LoRA's factors join the parameters under their own key; the model sees them folded into
        the frozen kernels (:mod:`jaxtl.lora`)."""
        lora = self.cfg.lora
        params = self.variables["params"]
        targets = select_targets(params, self.spec.head_path, lora.targets)
        params[LORA_KEY] = init_factors(params, targets, lora.rank, self.cfg.seed)
        self.extra_keys += (LORA_KEY,)
        scale, dropout = lora.scale, lora.dropout

        def reparam(variables, key):
            return {**variables, "params": apply_factors(variables["params"], scale, dropout, key)}

        self.reparam = reparam
        self._fold = jax.jit(lambda v: {**v, "params": apply_factors(v["params"], scale)})
        factors = _count(params[LORA_KEY])
        head = _count(head_params(params, self.spec.head_path))
        base = _count({k: v for k, v in params.items() if k != LORA_KEY})
        self.log(f"lora: rank {lora.rank}, alpha {lora.alpha:g} on {len(targets)} kernels "
                 f"({'/'.join(targets[0][:-1])}, ...): {factors + head:,} trainable parameters "
                 f"({factors:,} in adapters + {head:,} in the head), {100 * (factors + head) / base:.2f}% "
                 f"of the model's {base:,}")

    def _check_resume_config(self) -> None:
        path = self.out / CONFIG_FILE
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"--resume: {path} is missing or unreadable; cannot tell how this run was "
                                  "started") from None
        try:  # paths the run was started with as typed (older runs) are read from here, as before
            saved = TrainConfig.from_dict(saved).with_absolute_paths().to_dict()
        except (TypeError, KeyError, ValueError, JaxtlError):
            pass  # compared as stored: a broken file shows up as differences below
        now = self.cfg.to_dict()
        diffs = [f"{k}: run {saved.get(k)!r}, now {now[k]!r}" for k in now
                 if k not in (*TrainConfig.RESUMABLE_CHANGES, "epochs") and saved.get(k) != now[k]]
        if diffs:
            raise ConfigError(f"--resume with different options than the run in {self.out} ({'; '.join(diffs[:3])}); "
                              "pass the same options (or only --resume --output DIR)")
        # More epochs extend the run (timm's resume: the schedule is recomputed for the new length and
        # goes on from the step reached); fewer than it was started with would cut its schedule short.
        self.extended_from = int(saved.get("epochs", self.cfg.epochs))
        if self.cfg.epochs < self.extended_from:
            raise ConfigError(f"--resume --epochs {self.cfg.epochs}: the run in {self.out} was started for "
                              f"{self.extended_from} epochs; pass --epochs {self.extended_from} or more")

    def _record_bad(self, lines: list[str]) -> None:
        self.skipped += lines
        if not self.primary:
            return
        with open(self.out / BAD_FILES, "a") as fh:
            fh.write("".join(line + "\n" for line in lines))

    def _resume_needs_frozen(self) -> bool:
        """Whether the stages left to a resumed run freeze anything (then the starting values are needed)."""
        if self.cfg.l2sp:  # the pretrained values are L2-SP's reference
            return True
        record = self.ckpts.record(self.ckpts.latest_step())
        return any(stage.frozen for stage in self.stages[int(record["stage"]):])

    def _write_initial_variables(self) -> None:
        """A random-init run with frozen groups keeps its starting variables once, in the run folder."""
        path = Path(self.frozen_ref["file"])
        if not path.is_file():
            write_variables_file(path, self.variables, {"backbone": self.spec.name, "seed": self.cfg.seed})
        self.frozen_ref["sha256"] = sha256_file(path)

    def _check_frozen_ref(self, record: dict) -> None:
        """A resume rebuilds the frozen groups from the file the run started from; refuse any other."""
        ref = record.get("frozen")
        if not ref or not any(stage.frozen for stage in self.stages[int(record["stage"]):]):
            return  # written before checkpoints referenced the frozen weights, or nothing is frozen any more
        if ref["sha256"] != self.frozen_ref["sha256"]:
            if self.cfg.weights == "none":
                raise CheckpointError(f"--resume: this run's starting variables {ref['file']} are missing or "
                                      f"changed (sha256 {str(ref['sha256'])[:12]}); its frozen layers cannot be "
                                      "rebuilt, so start the run again without --resume")
            raise CheckpointError(f"--resume: the frozen layers of this run come from {ref['file']} (sha256 "
                                  f"{ref['sha256'][:12]}), but the weights found now are {self.frozen_ref['file']} "
                                  f"(sha256 {str(self.frozen_ref['sha256'])[:12]}); pass the run's file with "
                                  "--weights-file")

    def _num_features(self) -> int:
        """Width of the pooled features (what the head and an objective's own classifiers see)."""
        size = self.pre.input_size
        shape = jax.eval_shape(lambda v: self.model.apply(v, np.zeros((1, size, size, 3), np.float32),
                                                          features_only=True), self.variables)
        return int(shape.shape[-1])

    # -- compiled steps per stage -------------------------------------------------------------

    def compiled(self, stage: Stage) -> "_StageSteps":
        """What a stage trains with, built once: its labels, optimizer, mapped train step and frozen variables."""
        if stage.index not in self._compiled:
            labels = label_tree(self.spec, self.variables["params"], stage.frozen, extra_keys=self.extra_keys,
                                leaf_trains=self.cfg.strategy.leaf_trains)
            check_label_tree(labels, self.variables["params"])
            labels = trainable_labels(labels)
            if self.cfg.l2sp:  # L2-SP replaces the backbone's decay towards zero; the head keeps its own
                labels = _no_decay_except(labels, self.spec.group_names[-1])
            tx = make_optimizer(self.cfg.optim, labels, self.lr_mults, all_labels(self.spec), self.steps_per_epoch,
                                self.cfg.epochs)
            step = self.objective.make_step(self, stage, tx)
            step = pack_metrics(step, self.metric_names)
            if self.cfg.cache_features:  # the head alone: the whole epoch is one call, and no frozen variable is read
                mapped = self.dp.train_step(scan_steps(step), stacked=True)
                frozen = {"params": {}, "batch_stats": {}}
            else:
                remat = self.cfg.grad_checkpointing
                options = runtime.remat_compiler_options(self.dp.devices[0].platform) if remat else None
                mapped = self.dp.train_step(step, compiler_options=options)
                frozen = self._split(self.variables, stage.frozen)[1]
                if self.cfg.l2sp:
                    frozen[L2SP_REFERENCE] = self._l2sp_reference(stage)
            self._compiled[stage.index] = _StageSteps(labels, tx, mapped, self.dp.replicate(frozen))
        return self._compiled[stage.index]

    def _l2sp_reference(self, stage: Stage) -> dict:
        """The starting (pretrained) values of the backbone parameters that train in ``stage``."""
        trainable = self._split(self.variables, stage.frozen)[0]["params"]
        head = self.spec.head_path[0]
        return {k: v for k, v in trainable.items() if k != head and k not in self.extra_keys}

    def _eval_fn(self):
        if not hasattr(self, "_eval"):
            if self.cfg.cache_features:
                head = head_forward(self.spec.head_path)
                apply_logits = lambda v, feats: head(v, feats, None)[0]  # noqa: E731
            else:
                model, prepare = self.model, self.prepare_eval
                apply_logits = lambda v, images: model.apply(v, prepare(images), train=False)  # noqa: E731
            step = make_eval_step(apply_logits, num_classes=self.num_classes, axis_name=AXIS)
            self._eval = (self.dp.eval_step(map_eval(step), stacked=True) if self.cfg.cache_features
                          else self.dp.eval_step(step))
        return self._eval

    # -- feature cache ------------------------------------------------------------------

    def _cache_features(self, loader_kw: dict) -> None:
        """Run the frozen backbone once over train and val (no augmentation); the head trains on the result."""
        cached = cache_features(self.model, self.prepare_eval, self.dp, self.variables,
                                {"train": self.data.train, "val": self.data.val}, self.pre, self.eval_batch_size,
                                loader_kw, log=self.log, note_bad=self._note_bad)
        kw = dict(process_index=jax.process_index(), process_count=jax.process_count(), put=self.dp.put_batch)
        self.train_loader = ArrayLoader(*cached["train"], batch_size=self.cfg.batch_size, train=True,
                                        seed=self.cfg.seed, sample_weights=self._sample_weights(cached["train"][1]),
                                        **kw)
        self.val_loader = ArrayLoader(*cached["val"], batch_size=self.eval_batch_size, train=False, **kw)

    def _sample_weights(self, labels) -> np.ndarray | None:
        """--balanced-sampler: each example drawn with probability proportional to 1 / its class's count."""
        if not self.cfg.balanced_sampler:
            return None
        labels = np.asarray(labels)
        counts = np.bincount(labels, minlength=self.num_classes)
        return 1.0 / counts[labels]

    def _note_bad(self, loader) -> None:
        """Files that failed to decode while loading (they passed the header check)."""
        known = {line.split(": ", 1)[0] for line in self.skipped}
        new = [f"{p}: {r}" for p, r in getattr(loader, "bad", {}).items() if p not in known]
        if new:
            self._record_bad(new)
            self.log(f"skipped {len(new)} unreadable file(s) while loading: {new[0]}")

    # -- the run ------------------------------------------------------------------------

    def initial_state(self, stage: Stage) -> TrainState:
        trainable, _ = self._split(self.variables, stage.frozen)
        # Copies: the state is donated to the train step, and self.variables stays the run's start.
        return self.dp.replicate(self._new_state(_copy(trainable), self.compiled(stage).tx))

    def abstract_state(self, stage: Stage) -> TrainState:
        """Shapes, dtypes and shardings of ``stage``'s train state, the target a checkpoint restores
        into. No arrays are made or read."""
        trainable, _ = self._split(self.variables, stage.frozen)
        tx = self.compiled(stage).tx  # built outside the trace: the stage also places its frozen variables
        return self.dp.abstract_replicated(jax.eval_shape(lambda v: self._new_state(v, tx), trainable))

    def _split(self, variables: dict, frozen) -> tuple[dict, dict]:
        """``(trainable, frozen)`` parts of ``variables`` (strategies.split_variables), the objective's own
        parameters in the trainable part."""
        return split_variables(self.spec, variables, frozen, self.extra_keys, self.cfg.strategy.leaf_trains)

    def _new_state(self, trainable: dict, tx) -> TrainState:
        return create_train_state(trainable, tx, self.cfg.seed, plateau_init(self.cfg.optim), ema=self.cfg.model_ema)

    def _enter_stage(self, state: TrainState, old: Stage, new: Stage) -> TrainState:
        """Groups unfrozen at a stage boundary join the state with their starting values (frozen until
        now, so unchanged) and a fresh optimizer state; groups already training keep theirs."""
        if self.cfg.strategy.kind == "lp_ft":
            self.log("lp_ft: the linear probe is done; fine-tuning starts from its head")
        if not set(new.frozen) <= set(old.frozen):
            raise TrainingError(f"stage {new.index} freezes {', '.join(sorted(set(new.frozen) - set(old.frozen)))} "
                                "again after training it; strategies only unfreeze")
        trainable, _ = self._split(self.variables, new.frozen)
        _, joined = self._split(trainable, old.frozen)  # in the new trainable set, frozen before
        joined = self.dp.replicate(_copy(joined))
        params, batch_stats = merge(joined["params"], state.params), merge(joined["batch_stats"], state.batch_stats)
        old_steps, new_steps = self.compiled(old), self.compiled(new)
        opt_state = carry_over(state.opt_state, new_steps.tx.init(params), old_steps.labels, new_steps.labels)
        ema = state.ema
        if ema is not None:  # a group joins the average with its starting values
            ema = {"params": merge(joined["params"], ema["params"]),
                   "batch_stats": merge(joined["batch_stats"], ema["batch_stats"])}
        return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)

    def variables_of(self, state: TrainState, stage: Stage, ema: bool = False) -> dict:
        """The model's variables: ``stage``'s frozen constants and the state's trainable part (the
        objective's own parameters left out), or with ``ema`` its moving average. With cached
        features, what evaluation reads: the head."""
        trained = state.ema if ema else state.variables
        if self.cfg.cache_features:
            return trained
        variables = merge(self.compiled(stage).frozen, trained)
        variables.pop(L2SP_REFERENCE, None)
        if self.reparam is not None:
            variables = self._fold(variables)
        variables["params"] = {k: v for k, v in variables["params"].items() if k not in self.extra_keys}
        return variables

    def evaluate(self, variables: dict, loader=None) -> dict:
        """Loss, top-1, top-5 and predictions on a validation loader (default: the source's)."""
        loader = loader or self.val_loader
        evaluate = self._eval_fn()
        stacked = self.cfg.cache_features  # cached features: every batch in one call
        if stacked:
            if id(loader) not in self._placed:  # the same batches every epoch: placed once
                self._placed[id(loader)] = self.dp.put_batches(loader.stacked(0))
            outputs = [evaluate(variables, self._placed[id(loader)])]
        else:
            outputs = (evaluate(variables, batch) for batch in loader.epoch(0))
        sums, pred = accumulate(outputs, stacked, lambda p: self.dp.unshard_per_example(p, stacked))
        self._note_bad(loader)
        m = metrics(sums)
        return {"val_loss": m["loss"], "val_top1": m["top1"], "val_top5": m["top5"], "val_count": m["count"],
                "pred": pred[:loader.n]}

    def run(self) -> TrainResult:
        try:
            return self._run()
        except Exception as e:
            if isinstance(e, JaxtlError) or not lost_process(e):
                raise
            raise ProcessLost(
                f"process {jax.process_index()} of {jax.process_count()} lost contact with another process of the "
                f"run ({str(e).splitlines()[0][:120]}); the last complete checkpoint in {self.out / 'checkpoints'} "
                f"is kept: start all {jax.process_count()} processes again with --resume") from None
        finally:
            try:
                self.ckpts.close()  # waits for the last save: a failure to write it is reported
            finally:
                if self.lock is not None:
                    self.lock.release()

    def _restore(self, step: int) -> tuple[TrainState, Stage, dict]:
        """The state, stage and record of checkpoint ``step``; the record says which stage's optimizer
        structure the state has and where the frozen groups come from."""
        record = self.ckpts.record(step)
        stage = self.stages[int(record["stage"])]
        self._check_frozen_ref(record)
        if record.get(STATE_LAYOUT_KEY) == STATE_TRAINABLE:
            state, record = self.ckpts.restore(step, self.abstract_state(stage), record)
        else:
            state, record = self._restore_whole_model_state(step, stage, record)
        return state, stage, record

    def _restore_whole_model_state(self, step: int, stage: Stage, record: dict) -> tuple[TrainState, dict]:
        """A checkpoint written before train states held only what trains: the whole model's variables,
        the optimizer over all of them. Its trainable part is kept; its optimizer state has the same arrays
        in the same order as one over the trainable part (frozen labels hold none), so it is re-shaped."""
        labels = label_tree(self.spec, self.variables["params"], stage.frozen, extra_keys=self.extra_keys,
                            leaf_trains=self.cfg.strategy.leaf_trains)
        whole_tx = make_optimizer(self.cfg.optim, labels, self.lr_mults, all_labels(self.spec), self.steps_per_epoch,
                                  self.cfg.epochs)
        whole = jax.eval_shape(lambda v: create_train_state(v, whole_tx, self.cfg.seed, plateau_init(self.cfg.optim)),
                               self.variables)
        state, record = self.ckpts.restore(step, self.dp.abstract_replicated(whole), record)
        trainable, _ = self._split(state.variables, stage.frozen)
        target = self.abstract_state(stage)
        opt_state = jax.tree.unflatten(jax.tree.structure(target.opt_state), jax.tree.leaves(state.opt_state))
        return state.replace(params=trainable["params"], batch_stats=trainable["batch_stats"],
                             opt_state=opt_state), record

    def _run(self) -> TrainResult:
        cfg, log = self.cfg, self.log
        metrics_log = MetricsLog(self.out, write=self.primary)
        start_epoch, start_batch, partial_sums, nonfinite = 0, 0, None, 0
        stage = stage_at(self.stages, 0)
        if cfg.resume:
            step = self.ckpts.latest_step()
            state, stage, record = self._restore(step)
            start_epoch, start_batch = int(record["epoch"]), int(record["batch"])
            partial_sums, nonfinite = record.get("partial"), int(record.get("nonfinite_skipped", 0))
            records = metrics_log.keep_before(start_epoch)
            log(f"resumed from step {step}: epoch {start_epoch + 1}, batch {start_batch}")
        else:
            state = self.initial_state(stage)
            records = []
            metrics_log.clear()
        log(f"{cfg.strategy.kind}: {len(self.stages)} stage(s); stage {stage.index} trains "
            f"{', '.join(stage.trainable)}{_beside(cfg.strategy.kind)} ({_count(state.params):,} "
            f"parameters){f'; L2-SP weight {cfg.l2sp:g}' if cfg.l2sp else ''}; {self.dp.num_devices} device(s), "
            f"{self.dp.mapping}; {self.steps_per_epoch} steps/epoch")

        schedule = schedule_of(cfg.optim, self.steps_per_epoch, cfg.epochs)
        signals = self._signals = _Signals()
        last_eval = None
        # A resumed run that had already stopped early exports again without training.
        self.stopped_early = early_stop_reason(records, cfg.early_stop, cfg.early_stop_metric)
        with signals:
            for epoch in range(start_epoch, start_epoch if self.stopped_early else cfg.epochs):
                new_stage = stage_at(self.stages, epoch)
                if new_stage.index != stage.index:
                    state = self._enter_stage(state, stage, new_stage)
                    log(f"stage {new_stage.index}: now training {', '.join(new_stage.trainable)} "
                        f"({_count(state.params):,} parameters)")
                    stage = new_stage
                t0 = time.perf_counter()
                sums = dict(partial_sums or self.objective.zero_sums())
                first = start_batch if epoch == start_epoch else 0
                state, sums, nonfinite, stopped_at = self._train_epoch(state, stage, epoch, first, sums,
                                                                       nonfinite, signals)
                partial_sums = None
                if stopped_at is not None:
                    self._save(state, epoch, stopped_at, stage, sums, nonfinite, None)
                    raise Interrupted(
                        f"interrupted at epoch {epoch + 1}, batch {stopped_at}; checkpoint saved (step "
                        f"{int(state.step)}) in {self.out}; continue with: python -m jaxtl.train --resume "
                        f"--output {self.out.absolute()}")
                variables = self.variables_of(state, stage)
                last_eval = self.evaluate(variables)
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
                if cfg.strategy.kind == "lp_ft":
                    record["phase"] = "linear_probe" if epoch < cfg.strategy.lp_epochs else "fine_tune"
                record.update(self.objective.record(sums, int(state.step), self.steps_per_epoch * cfg.epochs))
                if self.target_val_loader is not None:
                    target_eval = self.evaluate(variables, self.target_val_loader)
                    record.update(target_val_loss=target_eval["val_loss"], target_val_top1=target_eval["val_top1"],
                                  target_val_top5=target_eval["val_top5"])
                if state.ema is not None:  # the moving average, evaluated beside the raw weights
                    ema_variables = self.variables_of(state, stage, ema=True)
                    ema_eval = self.evaluate(ema_variables)
                    record.update(ema_val_loss=ema_eval["val_loss"], ema_val_top1=ema_eval["val_top1"],
                                  ema_val_top5=ema_eval["val_top5"])
                    if self.target_val_loader is not None:
                        record["ema_target_val_top1"] = self.evaluate(ema_variables,
                                                                      self.target_val_loader)["val_top1"]
                if nonfinite:
                    record["nonfinite_skipped"] = nonfinite
                records.append(record)
                metrics_log.append(record)
                log(epoch_line(record, cfg.epochs))
                self._save(state, epoch + 1, 0, stage, None, nonfinite,
                           {"val_top1": record["val_top1"], "val_loss": record["val_loss"]})
                self.stopped_early = early_stop_reason(records, cfg.early_stop, cfg.early_stop_metric)
                if self.stopped_early:
                    log(f"stopping early after epoch {epoch + 1}: {self.stopped_early}")
                    break
                if self._stop_requested(signals) and epoch + 1 < cfg.epochs:  # came during a one-call epoch or the save
                    raise Interrupted(
                        f"interrupted after epoch {epoch + 1}; checkpoint saved (step {int(state.step)}) in "
                        f"{self.out}; continue with: python -m jaxtl.train --resume --output {self.out.absolute()}")
        return self._finish(state, records, last_eval, nonfinite)

    def _train_epoch(self, state, stage, epoch, first_batch, sums, nonfinite, signals):
        """Train one epoch; returns (state, sums, nonfinite, batch index if interrupted else None)."""
        cfg = self.cfg
        steps = self.compiled(stage)
        pending = None  # the previous step's metrics, read a step late to keep the device busy
        t0 = time.perf_counter()
        images = 0
        bar = None

        def consume(metrics, b):
            nonlocal nonfinite, images
            if not bool(metrics["finite"]):
                step_no = epoch * self.steps_per_epoch + b
                if not cfg.skip_nonfinite:
                    raise TrainingError(
                        f"non-finite loss or gradient at epoch {epoch + 1}, batch {b} (step {step_no}); stopped. "
                        f"The last good checkpoint is in {self.out / 'checkpoints'}; lower --lr, add --clip-grad, "
                        "or pass --skip-nonfinite")
                nonfinite += 1
                return
            for k in sums:
                sums[k] += float(metrics[k])
            images += int(metrics["count"])
            if bar is not None:
                bar.update(1)
                rate = bar.format_dict.get("rate") or 0.0  # steps/s since the step was compiled
                left = (cfg.epochs - epoch - 1) * self.steps_per_epoch + (bar.total - bar.n)
                bar.set_postfix(loss=f"{sums['loss_sum'] / max(sums['count'], 1):.4f}",
                                img_s=f"{images / max(time.perf_counter() - t0, 1e-9):.0f}",
                                run_left=_duration(left / rate) if rate else "?", refresh=False)

        if self.cfg.cache_features:  # one call for the epoch; the steps' metrics come back stacked
            batches = self.train_loader.stacked(epoch, first_batch)
            if batches is not None:
                state, metrics = steps.train_step(state, steps.frozen, self.dp.put_batches(batches))
                metrics = unpack_metrics(np.asarray(jax.device_get(metrics)), self.metric_names)
                for i in range(len(batches["label"])):
                    consume({k: v[i] for k, v in metrics.items()}, first_batch + i)
            return state, sums, nonfinite, None

        bar = _progress(cfg.progress and self.primary, total=self.steps_per_epoch, initial=first_batch,
                        desc=f"epoch {epoch + 1}/{cfg.epochs}")
        batch_index = first_batch
        compiling = bar is not None and stage.index not in self._stepped
        if compiling:  # the first call compiles: its seconds are not a step's
            bar.set_postfix_str("compiling the train step", refresh=True)
        try:
            for batch in self.objective.batches(self, epoch, first_batch):
                state, metrics = steps.train_step(state, steps.frozen, batch)
                if compiling:
                    bar.reset(total=self.steps_per_epoch)  # rates and estimates from here on
                    bar.update(batch_index)
                    t0, compiling = time.perf_counter(), False
                self._stepped.add(stage.index)
                if pending is not None:
                    consume(self._read_metrics(pending[0]), pending[1])
                pending = (metrics, batch_index)
                batch_index += 1
                if signals.received is not None and jax.process_count() == 1:  # several processes stop together
                    break
            if pending is not None:
                consume(self._read_metrics(pending[0]), pending[1])
        finally:
            if bar is not None:
                bar.close()
        self._note_bad(self.train_loader)
        if signals.received is not None and batch_index < self.steps_per_epoch:
            return state, sums, nonfinite, batch_index
        return state, sums, nonfinite, None

    @staticmethod
    def _stop_requested(signals: _Signals) -> bool:
        """Whether a signal asked the run to stop. Processes of a run of several stop together, at the end of
        an epoch, when any of them got one: each has to take part in every step and save."""
        received = signals.received is not None
        if jax.process_count() == 1:
            return received
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([received]))))

    def _read_metrics(self, packed) -> dict:
        return unpack_metrics(np.asarray(jax.device_get(packed)), self.metric_names)

    def _save(self, state, epoch: int, batch: int, stage: Stage, partial_sums, nonfinite: int, metrics) -> None:
        record = {"epoch": epoch, "batch": batch, "stage": stage.index, "partial": partial_sums,
                  "nonfinite_skipped": nonfinite, "frozen": self.frozen_ref, STATE_LAYOUT_KEY: STATE_TRAINABLE}
        with self._signals.saving():  # a signal now waits for the save: it never leaves half a checkpoint
            self.ckpts.save(int(state.step), state, record, metrics)

    def _finish(self, state, records, last_eval, nonfinite) -> TrainResult:
        cfg = self.cfg
        export_state = state
        exported = "best" if self.stopped_early else cfg.export
        if exported == "best" and self.ckpts.best_step() not in (None, int(state.step)):
            export_state, _, _ = self._restore(self.ckpts.best_step())
        final = records[-1] if records else {}
        # The frozen groups never changed: the run's starting variables with what trained on top.
        trained = export_state.ema if exported == "ema" else export_state.variables
        variables = merge(self.variables, jax.device_get(trained))
        if self.reparam is not None:  # LoRA's factors folded into their kernels: the plain backbone
            variables = merge_factors(variables, cfg.lora.scale)
        for key in self.extra_keys:  # the objective's own parameters stay behind
            variables["params"].pop(key, None)
        wise = None
        if cfg.wise_ft is not None:
            variables, wise = self._wise_ft(variables, cfg.wise_ft, final)
        meta = {
            "backbone": self.spec.name, "source": self.source, "num_classes": self.num_classes,
            "class_names": self.data.class_names, "preprocessing": self.pre.to_dict(),
            "model_kwargs": self.model_kwargs, "weights": self.origin,
            "training": {"data": cfg.data, "strategy": cfg.strategy_name, "epochs": cfg.epochs,
                         "exported": exported, "val_top1": final.get("val_top1"),
                         "best_val_top1": max((r["val_top1"] for r in records), default=None),
                         "target_val_top1": final.get("target_val_top1"), "seed": cfg.seed,
                         "hflip": bool(self.hflip)},
        }
        if wise is not None:
            meta["wise_ft"] = wise
        if self.stopped_early:
            meta["training"]["stopped_early"] = self.stopped_early
        if not self.primary:
            return TrainResult(self.out, records, state, list(self.skipped), nonfinite, variables)
        if cfg.calibrate:  # Guo et al.'s temperature, fitted on the validation images the run never trained on
            plain = create_model(self.spec.name, self.num_classes, source=self.source, **self.model_kwargs)
            meta["temperature"] = fit_on_source(plain, variables, self.pre, self.data.val,
                                                batch_size=self.eval_batch_size, workers=cfg.workers)
            self.log(f"temperature scaling: T = {meta['temperature']:.4f}, fitted on the validation split; "
                     "python -m jaxtl.predict divides the logits by it")
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
        self.log(f"exported the {exported} model to {path}; curves in {self.out / CURVES_FILE}")
        return TrainResult(self.out, records, state, list(self.skipped), nonfinite, variables)


    def _wise_ft(self, finetuned: dict, alpha: float, final: dict) -> tuple[dict, dict]:
        """WiSE-FT: the backbone interpolated between the pretrained and the fine-tuned one, the
        fine-tuned head kept (there is no zero-shot head to interpolate with); evaluated here."""
        pretrained = {c: {k: v for k, v in tree.items() if k not in self.extra_keys} if c == "params" else tree
                      for c, tree in self.variables.items()}
        variables = interpolate(pretrained, finetuned, alpha, keep=self.spec.head_path)
        placed = self.dp.replicate(variables)
        wise = {"alpha": alpha, "head": "fine-tuned (no zero-shot head)", "val_top1": self.evaluate(placed)["val_top1"]}
        line = (f"WiSE-FT alpha {alpha:g}: validation top-1 {wise['val_top1']:.4f} (fine-tuned "
                f"{final.get('val_top1', float('nan')):.4f})")
        if self.target_val_loader is not None:
            wise["target_val_top1"] = self.evaluate(placed, self.target_val_loader)["val_top1"]
            line += (f", target top-1 {wise['target_val_top1']:.4f} (fine-tuned "
                     f"{final.get('target_val_top1', float('nan')):.4f})")
        self.log(line + "; the head is the fine-tuned one")
        return variables, wise


@dataclass(frozen=True)
class _StageSteps:
    labels: Any        # label tree of the trainable parameters
    tx: Any            # optax.GradientTransformation over them
    train_step: Callable  # mapped: (state, frozen, batch) -> (state, metrics); stacked batches with cached features
    frozen: dict       # the frozen groups' variables, replicated (constants of the step)


def _remove_what_this_start_made(folder: Path, before: set[Path]) -> None:
    """A failed start leaves no trace: the lock file, an empty checkpoints folder and the run folder
    itself go again if this start made them (``before``: those that existed) and they hold nothing."""
    try:
        if folder / ".lock" not in before:
            (folder / ".lock").unlink(missing_ok=True)
        ckpts = folder / "checkpoints"
        if ckpts not in before and ckpts.is_dir() and not any(ckpts.iterdir()):
            ckpts.rmdir()
        if folder not in before and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass  # best effort: never hide the error that stopped the start


def _quiet(line: str) -> None:
    """The log of processes other than process 0."""


def _write_atomically(path: Path, text: str) -> None:
    """Readers (the other processes of a run, a resume) see the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_same_options(cfg: TrainConfig) -> None:
    """Every process of a run must train the same run: process 0's options against this process's."""
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).digest(), np.uint8)
    if not np.array_equal(multihost_utils.broadcast_one_to_all(digest), digest):
        raise ConfigError(f"process {jax.process_index()} was started with other options than process 0; start "
                          "every process with the same options (only --process-id differs)")


def early_stop_reason(records: list[dict], patience: int | None, metric: str) -> str | None:
    """Why the run stops after the last of ``records``, or None: ``metric`` has not improved on its best
    for ``patience`` epochs. A function of the records alone, so a resumed run decides the same."""
    if not patience or not records:
        return None
    values = [r[metric] for r in records]
    best = int(np.argmin(values) if metric == "val_loss" else np.argmax(values))  # the first best epoch
    if len(values) - 1 - best < patience:
        return None
    return (f"{metric} has not improved for {len(values) - 1 - best} epochs (best {values[best]:.4f} after epoch "
            f"{records[best]['epoch'] + 1}); the best checkpoint is exported")


def _beside(kind: str) -> str:
    """What trains besides the trainable groups, for the log."""
    return {"lora": " + LoRA adapters", "bitfit": " + the backbone's biases and norm scales"}.get(kind, "")


def _no_decay_except(labels: dict, head_group: str) -> dict:
    """Labels with weight decay left only on the head group's kernels."""
    def relabel(label: str) -> str:
        return label if label == head_group or label.endswith(NO_DECAY_SUFFIX) else label + NO_DECAY_SUFFIX

    return jax.tree.map(relabel, labels)


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _progress(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="batch", leave=False, dynamic_ncols=True, mininterval=0.5, file=sys.stderr, **kw)


def train(config: TrainConfig | None = None, *, log: Callable[[str], None] = print, **options) -> TrainResult:
    """Run a training job; returns its per-epoch records, final train state and exported variables.

        jaxtl.train(data="photos/", backbone="resnet50", strategy="finetune", epochs=5, output="runs/pets")

    ``options`` are :class:`TrainConfig`'s fields, over ``config`` when both are
    given. With neither, the offline default job runs (see jaxtl.training.config).
    Makes jaxtl's process settings first (:func:`jaxtl.runtime.configure`).
    """
    runtime.configure()
    if config is None:
        config = TrainConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    return Trainer(config, log).run()


__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "Interrupted"]
