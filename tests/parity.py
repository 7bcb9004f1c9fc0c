"""Parity checks against the real torchvision / timm models.

A converted model is right when it matches the PyTorch model on the same
input. BatchNorm is made non-trivial first (random running statistics and
affine parameters), and both modes are compared: eval (running statistics)
and train (batch statistics, plus the running statistics after the update).
Tolerance: max |delta| <= 1e-4 * max |reference| in float32.

Train mode in deep networks is ill-conditioned: BatchNorm with batch
statistics divides by small per-channel deviations, so float32 rounding grows
layer by layer. On ResNet-152 (batch 2, 64 px) PyTorch's own float32 output
is 1.2e-3 (relative) away from its float64 output. There the bound is
``max(1e-4, 2 x PyTorch's own float32 error)``, measured in the same test by
running the PyTorch model in float64: jaxtl must be as close to the exact
result as PyTorch itself is. Real bugs are far larger (the biased variance
alone is off by n/(n-1), 14 % for n = 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import jaxtl
from jaxtl.torch_ref import build_torch_model

TOLERANCE = 1e-4


def randomize_norm_layers(model, seed: int = 0) -> None:
    """Random running stats and affine params in every BatchNorm / LayerNorm."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                mod.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
            elif isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and mod.weight is not None:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)


def randomize_biases(model, seed: int, scale: float = 0.5) -> None:
    """Random conv / Linear biases: torchvision and timm initialise many of them
    (squeeze-excitation, classifier, VGG's convs) to zero, which would hide a
    bias applied in the wrong place."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * scale)


def randomize_zero_initialised(model, seed: int) -> None:
    """Every family at once (tools/parity_report.py): random biases, layer
    scales, class token, position embedding and head weights, all of which
    some library initialises to zero (or to 1e-6)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "gamma" in name or "layer_scale" in name or name.endswith("head.weight") \
                    or "cls_token" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def disable_dropout(model) -> None:
    """Dropout/drop-path off so train mode is deterministic in PyTorch."""
    import torch

    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if type(mod).__name__ == "DropPath":
            mod.drop_prob = 0.0
        if type(mod).__name__ == "StochasticDepth":
            mod.p = 0.0


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max |ref|."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


@dataclass
class ParityResult:
    eval_err: float
    train_err: float | None = None
    stats_err: float | None = None  # worst leaf of the updated running statistics
    stats_leaf: str = ""
    # PyTorch's own float32 error against float64 (train mode), when measured.
    torch_train_fp32_err: float | None = None
    torch_stats_fp32_err: float | None = None

    @property
    def worst(self) -> float:
        return max(e for e in (self.eval_err, self.train_err, self.stats_err) if e is not None)

    def train_bound(self) -> float:
        return max(TOLERANCE, 2 * (self.torch_train_fp32_err or 0.0))

    def stats_bound(self) -> float:
        return max(TOLERANCE, 2 * (self.torch_stats_fp32_err or 0.0))

    def assert_ok(self) -> None:
        assert self.eval_err <= TOLERANCE, f"eval-mode logits differ: {self}"
        if self.train_err is not None:
            assert self.train_err <= self.train_bound(), f"train-mode logits differ: {self}"
        if self.stats_err is not None:
            assert self.stats_err <= self.stats_bound(), f"updated running statistics differ: {self}"


def check_parity(name: str, source: str, *, size: int = 64, batch: int = 2, seed: int = 0, train: bool = True,
                 torch_kwargs: dict | None = None, jax_kwargs: dict | None = None,
                 prepare=None) -> ParityResult:
    """Compare jaxtl with torchvision/timm in eval (and train) mode; returns relative errors.

    ``prepare(torch_model, seed)``, if given, runs after the norm layers are
    randomised, e.g. to replace zero-initialised parameters (torchvision's ViT
    head) that would make the comparison vacuous.
    """
    import torch

    torch.manual_seed(seed)
    tmodel = build_torch_model(name, source, **(torch_kwargs or {}))
    randomize_norm_layers(tmodel, seed)
    disable_dropout(tmodel)
    if prepare is not None:
        prepare(tmodel, seed)
    state = {k: v.clone() for k, v in tmodel.state_dict().items()}

    model, variables = jaxtl.from_state_dict(name, state, source=source, **(jax_kwargs or {}))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    with torch.no_grad():
        ref_eval = tmodel.eval()(xt).numpy()
    with jax.default_matmul_precision("highest"):
        out_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
    result = ParityResult(rel_err(out_eval, ref_eval))
    if not train:
        return result

    with torch.no_grad():
        ref_train = tmodel.train()(xt).numpy()
    with jax.default_matmul_precision("highest"):
        out_train, updates = jax.jit(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, jnp.asarray(x))
    result.train_err = rel_err(out_train, ref_train)
    if "batch_stats" in variables:
        _, expected = jaxtl.from_state_dict(name, tmodel.state_dict(), source=source, **(jax_kwargs or {}))
        got = traverse_util.flatten_dict(updates["batch_stats"], sep="/")
        want = traverse_util.flatten_dict(expected["batch_stats"], sep="/")
        assert got.keys() == want.keys()
        errs = {k: rel_err(got[k], want[k]) for k in want}
        leaf = max(errs, key=errs.get)
        result.stats_err, result.stats_leaf = errs[leaf], leaf
        # The update must actually have happened (guards against comparing
        # the untouched initial statistics with themselves).
        before = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
        assert any(not np.allclose(before[k], want[k]) for k in want), "running statistics did not change"
    if result.worst > TOLERANCE:
        _measure_torch_fp32_noise(result, name, source, state, xt, ref_train, tmodel.state_dict(), torch_kwargs)
    return result


def _measure_torch_fp32_noise(result: ParityResult, name, source, state, xt, ref32, stats32, torch_kwargs) -> None:
    """How far PyTorch's own float32 train step is from float64 on the same input."""
    import torch

    m64 = build_torch_model(name, source, **(torch_kwargs or {}))
    disable_dropout(m64)
    m64.load_state_dict(state)
    m64 = m64.double().train()
    with torch.no_grad():
        ref64 = m64(xt.double()).numpy()
    result.torch_train_fp32_err = rel_err(ref32, ref64)
    stats64 = m64.state_dict()
    errs = [rel_err(stats32[k].double().numpy(), stats64[k].numpy()) for k in stats32
            if k.endswith(("running_mean", "running_var"))]
    result.torch_stats_fp32_err = max(errs) if errs else 0.0
