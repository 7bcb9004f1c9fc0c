"""``python -m jaxtl.models``: the backbones jaxtl knows, and one backbone in detail.

    python -m jaxtl.models                      # every backbone: family, sources and their weight tags, input size
    python -m jaxtl.models 'vit_*' --params     # the ViTs, with their parameter counts
    python -m jaxtl.models resnet50             # one backbone: weights, preprocessing, layer groups for --freeze-until
"""

from __future__ import annotations

import argparse
import fnmatch

import jax
import numpy as np

from jaxtl.cli import run_cli
from jaxtl.registry import BackboneSpec, list_models, resolve


def parameter_count(spec: BackboneSpec, num_classes: int = 1000) -> int:
    from jaxtl.models import abstract_variables, create_model

    params = abstract_variables(create_model(spec.name, num_classes), spec)["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def group_sizes(spec: BackboneSpec, num_classes: int = 1000) -> dict[str, int]:
    """Parameters per layer group, in the order strategies freeze and unfreeze them."""
    from flax import traverse_util

    from jaxtl.models import abstract_variables, create_model

    params = abstract_variables(create_model(spec.name, num_classes), spec)["params"]
    sizes = {g: 0 for g in spec.group_names}
    for path, leaf in traverse_util.flatten_dict(params).items():
        sizes[spec.group_of(path)] += int(np.prod(leaf.shape))
    return sizes


def _sources(spec: BackboneSpec) -> str:
    parts = []
    for name, src in spec.sources.items():
        tags = ", ".join(w.tag for w in src.weights) or "no published weights"
        parts.append(f"{name} ({tags})")
    return "; ".join(parts)


def table(names: list[str], params: bool) -> str:
    lines = []
    width = max([len(n) for n in names] + [len("name")])
    for name in names:
        spec, _ = resolve(name)
        row = f"{name:<{width}} {spec.family:<13} {spec.preprocessing.input_size:>4} px  "
        if params:
            row += f"{parameter_count(spec) / 1e6:7.1f} M  "
        lines.append(row + _sources(spec))
    header = (f"{'name':<{width}} {'family':<13} {'input':>7}  " + ("params     " if params else "")
              + "sources (weight tags)")
    return "\n".join([header, *lines])


def details(name: str) -> str:
    spec, implied = resolve(name)
    out = [f"{spec.name} ({spec.family}){': ' + spec.description if spec.description else ''}",
           f"parameters: {parameter_count(spec):,} with a 1000-class head at {'/'.join(spec.head_path)}"]
    for source_name, src in spec.sources.items():
        default = " (default)" if source_name == spec.default_source else ""
        out.append(f"source {source_name}{default}: {src.model_name}")
        for w in src.weights:
            pre = w.preprocessing
            out.append(f"  {w.tag}: {w.filename}; {pre.input_size} px (resize {pre.resize_size}, "
                       f"{pre.interpolation}), mean {pre.mean}, std {pre.std}")
    out.append("layer groups, input to head (--freeze-until G keeps G and those before it frozen):")
    for group, size in group_sizes(spec).items():
        out.append(f"  {group:<12} {size:>12,} parameters")
    out.append(lora_line(spec))
    return "\n".join(out)


def lora_line(spec: BackboneSpec) -> str:
    """Which kernels ``--strategy lora`` adapts by default (``--lora-targets`` matches these paths)."""
    from jaxtl.lora import select_targets
    from jaxtl.models import abstract_variables, create_model

    params = abstract_variables(create_model(spec.name, 1000), spec)["params"]
    targets = ["/".join(t) for t in select_targets(params, spec.head_path, None)]
    shown = ", ".join(targets[:3]) + (", ..." if len(targets) > 3 else "")
    return f"LoRA's default targets (--strategy lora): {len(targets)} kernels: {shown}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxtl.models", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("pattern", nargs="?", help="a backbone name (its details) or a shell pattern such as 'vit_*'")
    p.add_argument("--params", action="store_true", help="count the parameters of each listed backbone (slower)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.pattern and not any(c in args.pattern for c in "*?["):
        print(details(args.pattern))
        return 0
    names = [n for n in list_models() if not args.pattern or fnmatch.fnmatch(n, args.pattern)]
    print(table(names, args.params) if names else f"no backbone matches {args.pattern!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
