"""Transfer strategies as pure functions of the backbone's layer groups.

A strategy decides, for every epoch, which layer groups train and at which
learning-rate multiplier; it knows nothing about optimizers. The registry
orders each backbone's groups from input to head (``stem, layer1..4, head``
for a ResNet; ``embed, block0..block11, norm, head`` for a ViT-B).

* ``feature_extract`` - only the head trains; the backbone is frozen.
* ``finetune`` - everything trains; backbone groups at ``backbone_lr_mult`` x
  the head's rate (0.1 by default, as the guides recommend), optionally with
  the groups up to ``freeze_until`` kept frozen.
* ``progressive`` - starts as feature extraction and unfreezes backbone groups
  from the top down: one every ``unfreeze_every`` epochs, or at the explicit
  ``(epoch, group)`` pairs of ``unfreeze_at`` (fastai's ``freeze_to``, Lightning's
  ``BackboneFinetuning``). Each stage is a fixed set of frozen groups; the
  optimizer state of groups that were already training is carried over.
* ``lp_ft`` - LP-FT (Kumar et al., ICLR 2022): a linear probe for ``lp_epochs`` (the backbone
  frozen), then fine-tuning of everything from the probed head, as ``finetune`` does.
* ``lora`` - the backbone frozen; low-rank adapters on its kernels train beside the head
  (:mod:`jaxtl.lora`, a re-parametrisation of the parameter tree, not a change to the models).
* ``bitfit`` - BitFit (Ben Zaken et al., 2022): the backbone frozen except its biases and norm
  scales (:meth:`Strategy.leaf_trains`), which train at ``backbone_lr_mult``; the groups run in
  inference mode, so BatchNorm keeps its running statistics.

Per-group learning-rate multipliers for trainable backbone groups, at most one of:
``lr_mults`` (explicit, like per-layer Adam param groups), ``lr_spread`` (the first
group gets ``lr_spread`` x the head's rate, geometric in between: fastai's
``slice(lo, hi)``), ``layer_decay`` (timm's ``--layer-decay``: the group below the
head gets 1, each group further down ``layer_decay`` times less). Otherwise every
backbone group gets ``backbone_lr_mult``.

"Frozen" means frozen: a frozen group's parameters and BatchNorm statistics are
constants of the train step (:func:`split_variables`): no gradient, no optimizer
state, no update, no copy; its BatchNorm layers use running statistics and its
dropout is off (the Keras semantics). Only the trainable part is the train state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

from flax import traverse_util

from jaxtl.errors import ConfigError
from jaxtl.registry import BackboneSpec

STRATEGIES = ("feature_extract", "finetune", "progressive", "lp_ft", "lora", "bitfit")
# Strategies whose backbone never trains in full (features, adapters beside it, or a few leaves of it).
BACKBONE_FROZEN = ("feature_extract", "lora", "bitfit")
# BitFit's leaves: biases, and the scales of BatchNorm and LayerNorm.
BITFIT_LEAVES = ("bias", "scale")
FROZEN = "frozen"
NO_DECAY_SUFFIX = "/no_decay"
# Parameters an objective adds beside the backbone's (jaxtl.training.objectives), under top-level
# keys of their own, form one more group: it always trains, at the head's rate. Its labels are in
# every optimizer (all_labels), so a checkpoint's optimizer state has one shape whatever the
# objective; "domain" is the name checkpoints were written with.
EXTRA_GROUP = "domain"


@dataclass(frozen=True)
class Stage:
    """A span of epochs with one fixed set of frozen groups."""

    index: int
    start_epoch: int
    end_epoch: int        # exclusive
    frozen: tuple[str, ...]
    trainable: tuple[str, ...]


def stage_at(stages: Sequence[Stage], epoch: int) -> Stage:
    """The stage that ``epoch`` (0-based) falls in; epochs past the schedule stay in the last."""
    for stage in stages:
        if stage.start_epoch <= epoch < stage.end_epoch:
            return stage
    return stages[-1]


@dataclass(frozen=True)
class Strategy:
    kind: str = "finetune"
    backbone_lr_mult: float = 0.1
    freeze_until: str | None = None
    unfreeze_every: int = 1
    unfreeze_at: tuple[tuple[int, str], ...] = ()
    lr_mults: Mapping[str, float] | None = field(default=None, hash=False)
    lr_spread: float | None = None
    layer_decay: float | None = None
    lp_epochs: int | None = None      # lp_ft: epochs of the linear probe before fine-tuning

    def __post_init__(self):
        if self.kind not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.kind!r}; choose one of {', '.join(STRATEGIES)}")
        chosen = [n for n in ("lr_mults", "lr_spread", "layer_decay") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ConfigError(f"give at most one of lr_mults, lr_spread, layer_decay (got {', '.join(chosen)})")
        if self.backbone_lr_mult < 0:
            raise ConfigError(f"backbone_lr_mult must be >= 0, got {self.backbone_lr_mult}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.lr_spread is not None and not 0 < self.lr_spread <= 1:
            raise ConfigError(f"lr_spread must be in (0, 1] (first group's rate / head's rate), got {self.lr_spread}")
        if self.unfreeze_every < 1:
            raise ConfigError(f"unfreeze_every must be >= 1 epoch, got {self.unfreeze_every}")
        if self.unfreeze_at and self.kind != "progressive":
            raise ConfigError(f"unfreeze_at is a progressive schedule; it does not apply to {self.kind}")
        if self.kind in BACKBONE_FROZEN and self.freeze_until:
            raise ConfigError(f"{self.kind} freezes the whole backbone; freeze_until does not apply")
        if self.lp_epochs is not None and self.kind != "lp_ft":
            raise ConfigError(f"lp_epochs is the linear-probe phase of lp_ft; it does not apply to {self.kind}")
        if self.kind == "lp_ft" and self.lp_epochs is not None and self.lp_epochs < 1:
            raise ConfigError(f"lp_epochs must be >= 1, got {self.lp_epochs}")

    # -- which groups train when ------------------------------------------------

    def _floor(self, spec: BackboneSpec) -> int:
        """Number of leading groups that never train (freeze_until, inclusive)."""
        groups = spec.group_names
        if self.freeze_until is None:
            return 0
        if self.freeze_until not in groups[:-1]:
            raise ConfigError(f"freeze_until={self.freeze_until!r} is not a backbone group of {spec.name}; "
                              f"groups: {', '.join(groups[:-1])}")
        return groups.index(self.freeze_until) + 1

    def _unfreeze_epochs(self, spec: BackboneSpec) -> dict[str, int]:
        """Progressive: the epoch at which each backbone group starts training."""
        groups = spec.group_names
        backbone = groups[self._floor(spec):-1]
        if self.unfreeze_at:
            out = {}
            for epoch, group in self.unfreeze_at:
                if group not in backbone:
                    raise ConfigError(f"unfreeze_at names {group!r}, which is not an unfreezable backbone group of "
                                      f"{spec.name}; groups: {', '.join(backbone)}")
                if epoch < 0:
                    raise ConfigError(f"unfreeze_at epochs must be >= 0, got {epoch}")
                out[group] = int(epoch)
            return out
        # Top down: the group just below the head first.
        return {g: (k + 1) * self.unfreeze_every for k, g in enumerate(reversed(backbone))}

    def frozen_groups(self, spec: BackboneSpec, epoch: int = 0) -> tuple[str, ...]:
        groups = spec.group_names
        if self.kind in BACKBONE_FROZEN:
            return groups[:-1]
        floor = self._floor(spec)
        if self.kind == "finetune":
            return groups[:floor]
        if self.kind == "lp_ft":
            if self.lp_epochs is None:
                raise ConfigError("lp_ft needs lp_epochs, the epochs of its linear probe")
            return groups[:-1] if epoch < self.lp_epochs else groups[:floor]
        starts = self._unfreeze_epochs(spec)
        return tuple(g for g in groups[:-1] if g not in starts or epoch < starts[g])

    def leaf_trains(self, path: Sequence[str]) -> bool:
        """Whether a parameter trains although its group is frozen (BitFit's biases and norm scales)."""
        return self.kind == "bitfit" and path[-1] in BITFIT_LEAVES

    def trainable_groups(self, spec: BackboneSpec, epoch: int = 0) -> tuple[str, ...]:
        frozen = set(self.frozen_groups(spec, epoch))
        return tuple(g for g in spec.group_names if g not in frozen)

    def stages(self, spec: BackboneSpec, num_epochs: int) -> list[Stage]:
        """The epochs [start, end) of each distinct frozen set, in order."""
        out: list[Stage] = []
        for epoch in range(max(num_epochs, 1)):
            frozen = self.frozen_groups(spec, epoch)
            if not out or out[-1].frozen != frozen:
                if out:
                    out[-1] = Stage(out[-1].index, out[-1].start_epoch, epoch, out[-1].frozen, out[-1].trainable)
                trainable = tuple(g for g in spec.group_names if g not in frozen)
                out.append(Stage(len(out), epoch, num_epochs, frozen, trainable))
        return out

    def stage_of(self, spec: BackboneSpec, epoch: int, num_epochs: int) -> Stage:
        return stage_at(self.stages(spec, num_epochs), epoch)

    # -- learning-rate multipliers ---------------------------------------------------

    def lr_multipliers(self, spec: BackboneSpec) -> dict[str, float]:
        """Multiplier of the base learning rate for every group (head = 1)."""
        mults = self._group_multipliers(spec)
        mults[EXTRA_GROUP] = mults[spec.group_names[-1]]  # an objective's own parameters learn at the head's rate
        return mults

    def _group_multipliers(self, spec: BackboneSpec) -> dict[str, float]:
        groups = spec.group_names
        n = len(groups)
        if self.lr_mults is not None:
            unknown = sorted(set(self.lr_mults) - set(groups))
            if unknown:
                raise ConfigError(f"lr_mults names unknown group(s) {', '.join(unknown)}; "
                                  f"groups of {spec.name}: {', '.join(groups)}")
            mults = {g: float(self.lr_mults.get(g, self.backbone_lr_mult)) for g in groups[:-1]}
            mults[groups[-1]] = float(self.lr_mults.get(groups[-1], 1.0))
            return mults
        if self.layer_decay is not None:
            # timm: the head and the group below it share the top "layer id".
            return {g: (self.layer_decay ** max(n - 2 - i, 0) if i < n - 1 else 1.0) for i, g in enumerate(groups)}
        if self.lr_spread is not None:
            if n == 1:
                return {groups[0]: 1.0}
            return {g: self.lr_spread ** (1.0 - i / (n - 1)) for i, g in enumerate(groups)}
        return {g: (self.backbone_lr_mult if i < n - 1 else 1.0) for i, g in enumerate(groups)}


# ---------------------------------------------------------------------------
# Label trees


def _plain(tree: Any) -> dict:
    from flax.core import unfreeze

    return unfreeze(tree) if hasattr(tree, "unfreeze") else tree


def decays(path: Sequence[str]) -> bool:
    """Weight decay applies to conv/dense kernels only: never to norm scales,
    biases, class tokens, position embeddings or layer scales."""
    return path[-1] == "kernel"


def group_of(spec: BackboneSpec, path: Sequence[str], extra_keys: Collection[str] = ()) -> str:
    """The layer group of a variable path (without its collection); paths under ``extra_keys``
    (an objective's own parameters) are in :data:`EXTRA_GROUP`."""
    return EXTRA_GROUP if path[0] in extra_keys else spec.group_of(path)


def split_variables(spec: BackboneSpec, variables: Mapping[str, Any], frozen: Sequence[str],
                    extra_keys: Collection[str] = (), leaf_trains: Callable | None = None) -> tuple[dict, dict]:
    """``(trainable, frozen)``: the variables of the trainable groups and those of the frozen ones.

    Both keep every collection of ``variables`` (``params``, ``batch_stats``), each holding only its
    own leaves; :func:`jaxtl.training.state.merge` puts them back together. Parameters for which
    ``leaf_trains(path)`` holds (:meth:`Strategy.leaf_trains`) train inside frozen groups.
    """
    frozen = set(frozen)
    trainable_part, frozen_part = {}, {}
    for collection, tree in variables.items():
        flat = traverse_util.flatten_dict(_plain(tree))
        trains = {p: group_of(spec, p, extra_keys) not in frozen
                  or (collection == "params" and leaf_trains is not None and leaf_trains(p)) for p in flat}
        trainable_part[collection] = traverse_util.unflatten_dict({p: v for p, v in flat.items() if trains[p]})
        frozen_part[collection] = traverse_util.unflatten_dict({p: v for p, v in flat.items() if not trains[p]})
    return trainable_part, frozen_part


def trainable_labels(labels: Any) -> dict:
    """The label tree restricted to what trains (the ``"frozen"`` leaves dropped): the tree the
    optimizer partitions, matching the trainable parameters of :func:`split_variables`."""
    flat = traverse_util.flatten_dict(_plain(labels))
    return traverse_util.unflatten_dict({p: label for p, label in flat.items() if label != FROZEN})


def label_tree(spec: BackboneSpec, params: Any, frozen: Sequence[str], weight_decay: bool = True,
               extra_keys: Collection[str] = (), leaf_trains: Callable | None = None) -> dict:
    """One label per parameter: its group name (``+ "/no_decay"`` where weight
    decay must not apply), or ``"frozen"`` for parameters of frozen groups
    (unless ``leaf_trains(path)``: see :func:`split_variables`).
    Parameters under ``extra_keys`` are an objective's own (:data:`EXTRA_GROUP`)."""
    frozen = set(frozen)
    unknown = frozen - set(spec.group_names)
    if unknown:
        raise ConfigError(f"unknown group(s) {', '.join(sorted(unknown))} for {spec.name}; "
                          f"groups: {', '.join(spec.group_names)}")
    flat = traverse_util.flatten_dict(_plain(params))
    labels = {}
    for path in flat:
        group = group_of(spec, path, extra_keys)
        if group in frozen and not (leaf_trains is not None and leaf_trains(path)):
            labels[path] = FROZEN
        elif weight_decay and decays(path):
            labels[path] = group
        else:
            labels[path] = group + NO_DECAY_SUFFIX
    return traverse_util.unflatten_dict(labels)


def all_labels(spec: BackboneSpec) -> tuple[str, ...]:
    """Every label a label tree of this backbone can contain."""
    out = [FROZEN]
    for g in (*spec.group_names, EXTRA_GROUP):
        out += [g, g + NO_DECAY_SUFFIX]
    return tuple(out)


def label_group(label: str) -> str:
    return label[: -len(NO_DECAY_SUFFIX)] if label.endswith(NO_DECAY_SUFFIX) else label


def check_label_tree(labels: Any, params: Any) -> None:
    """Raise a ConfigError naming the first path where labels and params differ."""
    lf = traverse_util.flatten_dict(_plain(labels))
    pf = traverse_util.flatten_dict(_plain(params))
    only_params = sorted(pf.keys() - lf.keys())
    only_labels = sorted(lf.keys() - pf.keys())
    if only_params:
        raise ConfigError(f"label tree has no label for parameter {'/'.join(only_params[0])} "
                          f"({len(only_params)} parameter(s) unlabelled)")
    if only_labels:
        raise ConfigError(f"label tree labels {'/'.join(only_labels[0])}, which is not a parameter "
                          f"({len(only_labels)} extra label(s))")
    bad = [p for p, v in lf.items() if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"label of {'/'.join(bad[0])} is {lf[bad[0]]!r}, not a string")
