"""What a training run is asked to do: one dataclass, the single source of defaults.

``python -m jaxtl.train`` with no flags and ``jaxtl.train()`` with no options run
the same job: the offline default, torchvision's ImageNet MobileNetV2 on
scikit-learn's digits as feature extraction on cached features (Adam 1e-3,
cosine, 15 epochs). The command line's help shows these defaults; ``config.json``
in a run folder holds every option, so ``--resume`` continues the same run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from jaxtl.data.domains import SHIFTS
from jaxtl.data.mix import MixConfig
from jaxtl.errors import ConfigError
from jaxtl.lora import LoraConfig
from jaxtl.models import as_dtype
from jaxtl.optim import OptimConfig
from jaxtl.registry import resolve, split_weights_tag
from jaxtl.strategies import BACKBONE_FROZEN, Strategy

CONFIG_FILE = "config.json"
OBJECTIVES = ("classification", "dann")
EARLY_STOP_METRICS = ("val_loss", "val_top1")
DANN = "dann"


def strategy_and_objective(strategy_kw: dict, objective: str) -> tuple[dict, str]:
    """``--strategy dann`` (and config.json written when dann was a strategy kind) is finetune's
    groups with DANN's objective; every other strategy keeps the objective given."""
    if strategy_kw.get("kind") == DANN:
        return {**strategy_kw, "kind": "finetune"}, DANN
    return strategy_kw, objective


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
    strategy: Strategy | str = field(default_factory=lambda: Strategy("feature_extract"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 15
    batch_size: int = 32
    eval_batch_size: int | None = None
    img_size: int | None = None
    probe_blocks: int | None = None        # DINOv2/DINOv3: class tokens of the last N blocks in the features
    drop_path: float | None = None         # stochastic depth rate of the last block (None: the weights' default)
    grad_checkpointing: bool = False       # recompute each block's activations in the backward pass (ResNet, ViT)
    dtype: str = "float32"
    label_smoothing: float = 0.0
    class_weights: str | None = None       # "balanced": loss weights n / (classes x n_class) from the training set
    balanced_sampler: bool = False         # draw training examples with probability 1 / n_class (with replacement)
    mixup: float = 0.0                     # Mixup's Beta(alpha, alpha); 0: off (timm's --mixup)
    cutmix: float = 0.0                    # CutMix's Beta(alpha, alpha); 0: off (timm's --cutmix)
    mixup_prob: float = 1.0                # probability that an example is mixed
    mixup_switch_prob: float = 0.5         # with both: probability of CutMix instead of Mixup
    hflip: bool | None = None              # None: on unless the data says flips change the class (digits)
    color_jitter: float = 0.0
    crop_scale: float = 0.08               # random resized crop: smallest area fraction (torchvision's 0.08)
    aa: str | None = None                  # automatic augmentation, timm's strings: "rand-m9-mstd0.5", "trivial"
    reprob: float = 0.0                    # random erasing probability (timm's --reprob)
    seed: int = 0
    output: str = "runs/default"
    resume: bool = False
    cache_features: bool | None = None    # None: on for feature_extract (the backbone runs once), else off
    objective: str = "classification"      # or "dann": domain-adversarial training towards target_data
    target_data: str | None = None         # images of another domain: dann trains on them (unlabelled);
                                           # every strategy reports accuracy on their validation split
    domain_weight: float = 1.0             # dann: weight of the domain loss
    dann_separate_bn: bool = False         # dann: per-domain batch statistics in training (two passes)
    lora_rank: int = 8                     # lora: rank of the adapters
    lora_alpha: float = 8.0                # lora: the update is scaled by alpha / rank
    lora_targets: str | None = None        # lora: regex over kernel paths (default: attention or 1x1 kernels)
    lora_dropout: float = 0.0              # lora: dropout on the adapters' inputs (a mask per step)
    l2sp: float = 0.0                      # L2-SP: weight of ||backbone - pretrained||^2 / 2 in the loss
    wise_ft: float | None = None           # WiSE-FT: export (1 - a) x pretrained + a x fine-tuned backbone
    mapping: str = "shard_map"
    workers: int = 2
    keep_checkpoints: int = 2
    skip_nonfinite: bool = False
    export: str = "last"                   # "last", "best" or "ema"
    model_ema: bool = False                # keep an exponential moving average of the weights (timm)
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = True          # decay min(d, (1 + t) / (10 + t)) at update t
    calibrate: bool = False                # fit a softmax temperature on the validation split at export
    early_stop: int | None = None          # patience in epochs; the run then exports its best checkpoint
    early_stop_metric: str = "val_loss"    # or "val_top1"; with early_stop, also what "best" ranks by
    allow_download: bool = True
    progress: bool = True

    # Options that may differ between a run and its resumption.
    RESUMABLE_CHANGES = ("output", "resume", "workers", "progress", "allow_download", "wise_ft")

    def __post_init__(self):
        if isinstance(self.strategy, str):
            kw, self.objective = strategy_and_objective({"kind": self.strategy}, self.objective)
            self.strategy = Strategy(**kw)
        if not isinstance(self.strategy, Strategy):
            raise ConfigError(f"strategy must be a strategy name or a jaxtl.Strategy, got {type(self.strategy).__name__}")
        if not isinstance(self.optim, OptimConfig):
            raise ConfigError(f"optim must be a jaxtl.OptimConfig, got {type(self.optim).__name__}")
        if self.cache_features is None:
            self.cache_features = self.strategy.kind == "feature_extract"
        if self.strategy.kind == "lp_ft" and self.strategy.lp_epochs is None and isinstance(self.epochs, int):
            # Without --lp-epochs, half the run probes and half fine-tunes.
            self.strategy = dataclasses.replace(self.strategy, lp_epochs=max(1, self.epochs // 2))
        if isinstance(self.backbone, str):   # timm's "name.tag" names the weights too
            name, tag = split_weights_tag(self.backbone)
            if tag is not None:
                if self.weights_tag is not None and self.weights_tag.lower() != tag.lower():
                    raise ConfigError(f"--backbone {self.backbone} names weights {tag!r} but --weights-tag says "
                                      f"{self.weights_tag!r}; give one of them")
                self.backbone, self.weights_tag = name, tag

    @property
    def best_metric(self) -> str:
        """What the best checkpoint is ranked by: early stopping's metric, else validation top-1."""
        return self.early_stop_metric if self.early_stop is not None else "val_top1"

    @property
    def ema(self):
        """The EMA's configuration, or None without --model-ema."""
        from jaxtl.training.state import EmaConfig

        return EmaConfig(self.model_ema_decay, self.model_ema_warmup) if self.model_ema else None

    @property
    def auto_augment(self):
        """The parsed ``aa`` policy, or None."""
        from jaxtl.data.autoaugment import parse_auto_augment

        return parse_auto_augment(self.aa) if self.aa is not None else None

    @property
    def mix(self) -> MixConfig:
        return MixConfig(self.mixup, self.cutmix, self.mixup_prob, self.mixup_switch_prob)

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(self.lora_rank, self.lora_alpha, self.lora_targets, self.lora_dropout)

    @property
    def strategy_name(self) -> str:
        """What ``--strategy`` names: the strategy's kind, or ``dann`` for the adversarial objective."""
        return DANN if self.objective == DANN else self.strategy.kind

    def with_absolute_paths(self) -> "TrainConfig":
        """The same options with local paths made absolute: config.json, and so ``--resume``, do not
        depend on the folder the run was started from."""
        def absolute(value: str | None, data: bool) -> str | None:
            if value is None or (data and (value == "digits" or value in SHIFTS or value.startswith("tfds:"))):
                return value
            return os.path.abspath(os.path.expanduser(value))

        return dataclasses.replace(self, data=absolute(self.data, True), target_data=absolute(self.target_data, True),
                                   weights_file=absolute(self.weights_file, False),
                                   data_dir=absolute(self.data_dir, False))

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
        s, d["objective"] = strategy_and_objective(s, d.get("objective", "classification"))
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
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == DANN and not self.target_data:
            raise ConfigError("--strategy dann needs --target-data (images of the target domain: a folder, "
                              "digits-shifted, digits-inverted or tfds:NAME)")
        if self.domain_weight < 0:
            raise ConfigError(f"--domain-weight must be >= 0, got {self.domain_weight}")
        augments = [flag for flag, on in (("--hflip", self.hflip), ("--color-jitter", self.color_jitter),
                                          ("--crop-scale", self.crop_scale != 0.08), ("--aa", self.aa),
                                          ("--reprob", self.reprob)) if on]
        if self.aa is not None:
            self.auto_augment  # noqa: B018 - a bad --aa string is one line now
        if not 0 <= self.reprob <= 1:
            raise ConfigError(f"--reprob must be in [0, 1], got {self.reprob}")
        if self.cache_features and augments:
            raise ConfigError(f"{' and '.join(augments)} would do nothing: the features are cached once, without "
                              "augmentation (the default for feature_extract); add --no-cache-features to augment "
                              "every epoch, or drop them")
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
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise ConfigError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.probe_blocks is not None and self.probe_blocks < 1:
            raise ConfigError(f"--probe-blocks must be >= 1, got {self.probe_blocks}")
        if self.class_weights not in (None, "balanced"):
            raise ConfigError(f"--class-weights takes 'balanced', got {self.class_weights!r}")
        if (self.class_weights or self.balanced_sampler) and self.objective == DANN:
            raise ConfigError("--class-weights/--balanced-sampler with --strategy dann are not supported")
        if self.mix.enabled and self.cache_features:
            raise ConfigError("--mixup/--cutmix mix images, and cached features have none: add --no-cache-features")
        if self.mix.enabled and self.objective == DANN:
            raise ConfigError("--mixup/--cutmix with --strategy dann is not supported; use one of them")
        kind = self.strategy.kind
        if kind == "lora":
            self.lora  # noqa: B018 - checks the LoRA options
            if self.objective == DANN:
                raise ConfigError("--strategy dann trains the backbone in full; LoRA adapters with DANN are not "
                                  "supported: use one of them")
        elif (self.lora_targets is not None or self.lora_dropout or self.lora_rank != 8
              or self.lora_alpha != 8.0):
            raise ConfigError(f"--lora-* options configure --strategy lora; this run's strategy is {kind}")
        if kind == "lp_ft" and self.strategy.lp_epochs >= self.epochs:
            raise ConfigError(f"--lp-epochs {self.strategy.lp_epochs} leaves no fine-tuning in {self.epochs} epochs; "
                              f"give --epochs above it")
        if self.l2sp < 0:
            raise ConfigError(f"--l2sp must be >= 0, got {self.l2sp}")
        if self.l2sp and (kind in BACKBONE_FROZEN or self.objective == DANN):
            raise ConfigError(f"--l2sp pulls a backbone that trains towards its pretrained values; "
                              f"{self.strategy_name} does not train the backbone through this loss: use finetune, "
                              "progressive or lp_ft")
        if self.l2sp and self.weights == "none":
            raise ConfigError("--l2sp needs pretrained weights to pull towards; drop --weights none")
        if self.wise_ft is not None:
            if not 0 <= self.wise_ft <= 1:
                raise ConfigError(f"--wise-ft must be in [0, 1] (0: pretrained, 1: fine-tuned), got {self.wise_ft}")
            if kind == "feature_extract":
                raise ConfigError("--wise-ft interpolates a fine-tuned backbone with the pretrained one; "
                                  "feature_extract leaves the backbone as it was")
            if self.weights == "none":
                raise ConfigError("--wise-ft interpolates towards pretrained weights; drop --weights none")
        if self.export not in ("last", "best", "ema"):
            raise ConfigError(f"--export must be 'last', 'best' or 'ema', got {self.export!r}")
        if self.export == "ema" and not self.model_ema:
            raise ConfigError("--export ema exports the moving average of the weights: add --model-ema")
        if self.model_ema and not 0 <= self.model_ema_decay < 1:
            raise ConfigError(f"--model-ema-decay must be in [0, 1), got {self.model_ema_decay}")
        if self.model_ema and self.objective == DANN:
            raise ConfigError("--model-ema with --strategy dann is not supported; use one of them")
        if self.early_stop is not None and self.early_stop < 1:
            raise ConfigError(f"--early-stop must be >= 1 epoch of patience, got {self.early_stop}")
        if self.early_stop_metric not in EARLY_STOP_METRICS:
            raise ConfigError(f"--early-stop-metric must be one of {', '.join(EARLY_STOP_METRICS)}, got "
                              f"{self.early_stop_metric!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.optim.sched == "plateau" and self.optim.warmup_epochs:
            pass  # warm-up then a constant rate scaled by the plateau factor: fine
