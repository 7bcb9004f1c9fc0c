"""What a run optimises, behind one small interface the training loop calls.

An objective brings the parameters it adds beside the backbone's (and their top-level keys),
its per-device train step, the batches that step takes, the sums its metrics add up to, and
what it adds to an epoch's record. The loop drives any of them the same way, passing itself
(the :class:`jaxtl.training.loop.Trainer`: config, model, loaders, devices) as ``trainer``:

* :class:`Classification` - cross-entropy on labelled batches; the objective of every strategy.
* :class:`DomainAdversarial` - DANN (:mod:`jaxtl.training.dann`): the classification loss on the
  source plus a domain classifier, behind a gradient-reversal layer, on source and unlabelled
  target batches (``python -m jaxtl.train --strategy dann``).

Both update through :func:`jaxtl.training.step.apply_gradients`.
"""

from __future__ import annotations

from typing import Any, Iterator

from jaxtl.errors import ConfigError
from jaxtl.strategies import Stage
from jaxtl.training.config import OBJECTIVES, TrainConfig
from jaxtl.training.dann import DANN_METRICS, DOMAIN_KEY, ganin_lambda, init_domain_classifier, make_dann_step
from jaxtl.training.parallel import AXIS
from jaxtl.training.step import TRAIN_METRICS, head_forward, image_forward, make_train_step


class Classification:
    """Cross-entropy (with label smoothing) on labelled batches."""

    metric_names = TRAIN_METRICS
    extra_keys: tuple[str, ...] = ()       # top-level params keys of the objective's own parameters
    trains_on_target = False               # whether it trains on the target domain's images

    def init_params(self, num_features: int, seed: int) -> dict:
        """The parameters it adds beside the backbone's, by top-level key."""
        return {}

    def make_step(self, trainer: Any, stage: Stage, tx):
        """The per-device step ``(state, frozen, batch) -> (state, metrics)`` of ``stage``."""
        cfg = trainer.cfg
        if cfg.cache_features:
            forward = head_forward(trainer.spec.head_path, trainer.head_drop_rate)
        else:
            forward = image_forward(trainer.model, frozen=stage.frozen, prepare=trainer.prepare_train,
                                    reparam=trainer.reparam, mix=cfg.mix)
        size = trainer.pre.input_size
        return make_train_step(forward, tx, num_classes=trainer.num_classes, label_smoothing=cfg.label_smoothing,
                               l2sp=cfg.l2sp, mix=cfg.mix, mix_size=(size, size), ema=cfg.ema,
                               class_weights=trainer.class_weights, axis_name=AXIS)

    def batches(self, trainer: Any, epoch: int, first: int) -> Iterator[dict]:
        """The device batches of one epoch from batch ``first`` on."""
        return trainer.train_loader.epoch(epoch, first)

    def zero_sums(self) -> dict:
        return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}

    def record(self, sums: dict, step: int, total_steps: int) -> dict:
        """What it adds to an epoch's record beyond the training loss and accuracy."""
        return {}


class DomainAdversarial(Classification):
    """DANN: the label loss on source batches, the domain loss on source and target batches."""

    metric_names = DANN_METRICS
    extra_keys = (DOMAIN_KEY,)
    trains_on_target = True

    def __init__(self, domain_weight: float = 1.0, separate_bn: bool = False):
        self.domain_weight = domain_weight
        self.separate_bn = separate_bn

    def init_params(self, num_features: int, seed: int) -> dict:
        return {DOMAIN_KEY: init_domain_classifier(num_features, seed)}

    def make_step(self, trainer: Any, stage: Stage, tx):
        cfg = trainer.cfg
        return make_dann_step(trainer.model, tx, frozen=stage.frozen, head_path=trainer.spec.head_path,
                              num_classes=trainer.num_classes, prepare=trainer.prepare_train,
                              total_steps=trainer.steps_per_epoch * cfg.epochs, domain_weight=self.domain_weight,
                              drop_rate=trainer.head_drop_rate, separate_bn=self.separate_bn,
                              label_smoothing=cfg.label_smoothing, axis_name=AXIS)

    def batches(self, trainer: Any, epoch: int, first: int) -> Iterator[dict]:
        # The target batch of global step s is fixed by s alone, so a resumed run sees the same pairs.
        target = _target_stream(trainer.target_loader, epoch * trainer.steps_per_epoch + first)
        try:
            for batch in trainer.train_loader.epoch(epoch, first):
                t = next(target)
                yield trainer.dp.put_batch({**batch, "target_image": t["image"], "target_weight": t["weight"]})
        finally:
            target.close()

    def zero_sums(self) -> dict:
        return {**super().zero_sums(), "domain_loss_sum": 0.0, "domain_correct": 0.0, "domain_count": 0.0}

    def record(self, sums: dict, step: int, total_steps: int) -> dict:
        count = max(sums["domain_count"], 1.0)
        return {"domain_loss": sums["domain_loss_sum"] / count, "domain_acc": sums["domain_correct"] / count,
                "dann_lambda": float(ganin_lambda(step / total_steps))}


def _target_stream(loader, step: int):
    e, b = divmod(step, len(loader))
    while True:
        yield from loader.epoch(e, b)
        e, b = e + 1, 0


def make_objective(cfg: TrainConfig) -> Classification:
    """The objective a run's configuration asks for."""
    if cfg.objective == "classification":
        return Classification()
    if cfg.objective == "dann":
        return DomainAdversarial(cfg.domain_weight, cfg.dann_separate_bn)
    raise ConfigError(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
