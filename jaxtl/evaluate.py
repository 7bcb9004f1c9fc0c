"""``python -m jaxtl.evaluate``: loss, top-1, top-5, balanced accuracy, calibration error (ECE, 15 bins)
and per-class recall of a trained model.

    python -m jaxtl.evaluate --checkpoint runs/default --data digits
    python -m jaxtl.evaluate --checkpoint runs/flowers --data path/to/images --split all
    python -m jaxtl.evaluate --checkpoint runs/ft --data digits --target-data digits-shifted --wise-ft-sweep

The data is split exactly as in training (same ``--val-fraction`` and seed,
read from the run's config.json when the checkpoint folder has one), so
``--split val`` (the default) evaluates the images training never saw.

``--wise-ft-sweep [A,B,...]`` evaluates WiSE-FT (:mod:`jaxtl.wise_ft`): the run's backbone
interpolated with the pretrained one it started from, for each mixing coefficient (default 0, 0.1,
..., 1), on ``--data`` and on ``--target-data``'s validation split.

``--tta N`` averages the softmax probabilities over N views of each image (:mod:`jaxtl.tta`: 1 plain,
2 + mirror, 5 crops, 10 crops + mirrors). When the model's meta holds a temperature
(:mod:`jaxtl.calibration`), the NLL, ECE and top-1 are reported without and with it;
``--calibrate`` fits one on the evaluated split (``--write`` stores it in the model for
``python -m jaxtl.predict``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxtl.cli import run_cli
from jaxtl.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxtl.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a training run's --output folder (or a converted model)")
    p.add_argument("--data", required=True, help="an ImageFolder path, 'digits' or tfds:NAME")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data folder")
    p.add_argument("--split", choices=["val", "train", "all"], default="val", help="which part to evaluate")
    p.add_argument("--val-fraction", type=float, default=None, help="default: the run's (else 0.2)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the run's, else 0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--target-data", help="--wise-ft-sweep: also evaluate on this domain's validation split")
    p.add_argument("--wise-ft-sweep", nargs="?", const="", default=None, metavar="A,B,...",
                   help="evaluate WiSE-FT mixtures of the pretrained and the fine-tuned backbone (the head stays "
                        "fine-tuned); default coefficients 0,0.1,...,1")
    p.add_argument("--tta", type=int, default=1, metavar="N",
                   help="test-time augmentation: average the softmax over N views - 1 (default, none), 2 (+ "
                        "horizontal flip), 5 (centre and corner crops), 10 (5 crops and their flips)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature (temperature scaling) on the evaluated split and report the NLL and "
                        "ECE before and after; fit on --split val, the default")
    p.add_argument("--write", action="store_true", help="--calibrate: store the temperature in the model's meta, "
                                                        "so python -m jaxtl.predict applies it")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


def make_evaluator(model, pre, num_classes: int, batch_size: int, workers: int, tta: int = 1):
    """``(variables, source) -> (metric sums, predictions, unreadable files)`` for ``model`` in eval mode;
    ``with_confidence`` adds each example's top probability, ``with_logits`` then its (views, classes)
    logits. ``tta`` views per image have their probabilities averaged (:mod:`jaxtl.tta`)."""
    import jax

    from jaxtl import tta as tta_views
    from jaxtl.data.augment import eval_prepare
    from jaxtl.data.loader import Loader
    from jaxtl.training.evaluation import accumulate

    tta_views.check_views(tta)
    loader_pre = tta_views.loader_preprocessing(pre, tta)
    steps = {}

    def compiled(with_logits: bool):
        if with_logits not in steps:  # the plain step stays today's unless logits are asked for
            steps[with_logits] = jax.jit(tta_views.make_tta_eval_step(
                lambda v, x: model.apply(v, eval_prepare(x, pre), train=False), num_classes=num_classes, n=tta,
                input_size=pre.input_size, with_logits=with_logits))
        return steps[with_logits]

    def run(variables, source, with_confidence: bool = False, with_logits: bool = False):
        step = compiled(with_logits)
        loader = Loader(source, loader_pre, batch_size=batch_size, train=False, workers=workers)
        outputs = [step(variables, batch) for batch in loader.epoch(0)]
        sums, pred = accumulate(outputs)
        result = (sums, pred[:len(source)], loader.bad)
        if with_confidence or with_logits:
            result += (np.concatenate([np.asarray(o["confidence"]) for o in outputs])[:len(source)],)
        if with_logits:
            result += (np.concatenate([np.asarray(o["logits"], np.float32) for o in outputs])[:len(source)],)
        return result

    return run


def evaluate(args: argparse.Namespace) -> int:
    from jaxtl import calibration, tta
    from jaxtl.data.sources import load_dataset
    from jaxtl.errors import ConfigError
    from jaxtl.export import load_model
    from jaxtl.data.preprocessing import Preprocessing
    from jaxtl.training.evaluation import balanced_accuracy, expected_calibration_error, metrics
    from jaxtl.training.report import confusion_matrix, per_class_accuracy

    tta.check_views(args.tta)
    if args.write and not args.calibrate:
        raise ConfigError("--write stores the temperature --calibrate fits; add --calibrate")
    if args.write and args.tta != 1:
        raise ConfigError("--write stores the temperature predictions use by default, fitted on single views; "
                          "drop --tta (a temperature fitted on TTA's averaged probabilities is another)")
    if args.calibrate and args.wise_ft_sweep is not None:
        raise ConfigError("--calibrate fits the exported model's temperature; run it without --wise-ft-sweep")
    model, variables, meta = load_model(args.checkpoint)
    stored_t = calibration.stored_temperature(meta)
    run_config = Path(args.checkpoint) / "config.json"
    saved = json.loads(run_config.read_text()) if run_config.is_file() else {}
    val_fraction = args.val_fraction if args.val_fraction is not None else saved.get("val_fraction", 0.2)
    seed = args.seed if args.seed is not None else saved.get("seed", 0)
    data = load_dataset(args.data, data_dir=args.data_dir, val_fraction=val_fraction, seed=seed)
    names = meta.get("class_names")
    if names is not None and list(names) != list(data.class_names):
        raise DataError(f"the model was trained on classes {names[:5]}..., the data has {data.class_names[:5]}...; "
                        "evaluate on data with the same class folders")
    if data.num_classes != int(meta["num_classes"]):
        raise DataError(f"the model has {meta['num_classes']} classes, the data {data.num_classes}")
    tta.check_views(args.tta, tta.flips_allowed(saved, meta, data), f"{args.checkpoint} (on {data.name})")
    pre = Preprocessing.from_dict(meta["preprocessing"])
    run = make_evaluator(model, pre, data.num_classes, args.batch_size, args.workers, tta=args.tta)
    if args.wise_ft_sweep is not None:
        return wise_ft_sweep(args, variables, meta, data, run, val_fraction, seed)
    if args.target_data:
        raise DataError("--target-data goes with --wise-ft-sweep; to evaluate on another domain, pass it as --data")
    if args.split == "val":
        source = data.val
    elif args.split == "train":
        source = data.train
    else:
        source = _concat(data.train, data.val)
    with_logits = args.calibrate or stored_t is not None
    sums, pred, bad, confidence, *logits = run(variables, source, with_confidence=True, with_logits=with_logits)
    keep = np.ones(len(source), bool)
    for i in range(len(source)):
        if source.describe(i) in bad:
            keep[i] = False
    cm = confusion_matrix(source.labels[keep], pred[keep], data.num_classes)
    per_class = per_class_accuracy(cm)
    m = metrics(sums)
    ece = expected_calibration_error(confidence[keep], pred[keep] == source.labels[keep])
    result = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split, "images": m["count"],
              "tta": args.tta, "loss": m["loss"], "top1": m["top1"], "top5": m["top5"],
              "balanced_accuracy": balanced_accuracy(per_class), "ece": ece,
              "per_class_top1": {name: (None if np.isnan(a) else float(a)) for name, a in zip(data.class_names,
                                                                                              per_class)},
              "skipped": sorted(bad)}
    notes: list[str] = []
    if with_logits:
        kept_logits, kept_labels = logits[0][keep], source.labels[keep]
        # "Before" is the evaluation above (T = 1): the device's float32 numbers, which the host's float64 could
        # differ from where a confidence sits exactly on an ECE bin edge (k / 5 with five views).
        before = {"nll_before": result["loss"], "ece_before": result["ece"], "top1_before": result["top1"]}
        if stored_t is not None:
            result["calibration"] = {**calibration.report(kept_logits, kept_labels, stored_t), **before}
            if args.tta != 1:
                notes.append(f"the model's temperature was fitted on single views; --calibrate --tta {args.tta} "
                             "fits one for the averaged probabilities")
        if args.calibrate:
            fitted = calibration.fit_temperature(kept_logits, kept_labels)
            result["calibrated"] = {**calibration.report(kept_logits, kept_labels, fitted), **before,
                                    "fitted_on": args.split, "written": False}
            notes.append(f"the temperature was fitted on the images it is reported on ({args.split} split), so the "
                         "'after' numbers are optimistic" + ("" if args.split == "val" else
                                                             "; fit on --split val (the default), which training "
                                                             "never saw"))
            if calibration.at_bound(fitted):
                notes.append(f"T = {fitted:.4g} is at the bound of the search {calibration.T_RANGE}: the NLL keeps "
                             "falling beyond it (e.g. every image right with a margin)")
            if args.write:
                path = calibration.write_temperature(args.checkpoint, fitted)
                result["calibrated"]["written"] = str(path)
                notes.append(f"stored T = {fitted:.4f} in {path} and its meta.json"
                             + (f" (it held T = {stored_t:.4f})" if stored_t is not None else "")
                             + "; python -m jaxtl.predict applies it")
    if notes:
        result["notes"] = notes
    if args.json:
        print(json.dumps(result))
        return 0
    views = "" if args.tta == 1 else f" (TTA: {tta.VIEW_NAMES[args.tta]}, probabilities averaged)"
    print(f"{args.split} split of {args.data}: {result['images']} images{views}")
    print(f"  loss {result['loss']:.4f}   top-1 {result['top1']:.4f}   top-5 {result['top5']:.4f}")
    print(f"  balanced accuracy {result['balanced_accuracy']:.4f}   expected calibration error (15 bins) "
          f"{result['ece']:.4f}")
    for key, what in (("calibration", "the model's temperature"), ("calibrated", "the fitted temperature")):
        if key in result:
            c = result[key]
            print(f"  {what} T = {c['temperature']:.4f}: NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}   "
                  f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}   top-1 {c['top1_before']:.4f} -> "
                  f"{c['top1_after']:.4f}")
    print("  per-class recall (top-1):")
    width = max(len(str(c)) for c in data.class_names)
    for name, acc, total in zip(data.class_names, per_class, cm.sum(axis=1)):
        shown = "   n/a" if np.isnan(acc) else f"{acc:.4f}"
        print(f"    {str(name):<{width}}  {shown}  ({total} images)")
    if bad:
        print(f"  skipped {len(bad)} unreadable file(s): {', '.join(sorted(bad)[:3])}")
    for note in notes:
        print(f"  note: {note}")
    return 0


def wise_ft_sweep(args: argparse.Namespace, finetuned: dict, meta: dict, data, run, val_fraction: float,
                  seed: int) -> int:
    """Validation (and target-domain) accuracy of WiSE-FT at each mixing coefficient."""
    from jaxtl.data.sources import load_dataset
    from jaxtl.errors import ConfigError
    from jaxtl.registry import get_spec
    from jaxtl.training.evaluation import metrics
    from jaxtl.training.start import pretrained_of_run
    from jaxtl.wise_ft import HEAD_KEPT, interpolate, parse_alphas

    alphas = parse_alphas(args.wise_ft_sweep or None)
    done = meta.get("wise_ft")
    if done and done.get("alpha") != 1:
        raise ConfigError(f"{args.checkpoint} exported a WiSE-FT mixture (alpha {done.get('alpha')}), not the "
                          "fine-tuned model the sweep starts from; train without --wise-ft to sweep")
    pretrained = pretrained_of_run(Path(args.checkpoint), meta)
    target = None
    if args.target_data:
        target = load_dataset(args.target_data, data_dir=args.data_dir, val_fraction=val_fraction,
                              seed=seed)
        if list(target.class_names) != list(data.class_names):
            raise DataError(f"--target-data {args.target_data} has other classes than --data {args.data}; "
                            "the target accuracy needs the same classes")
    head = get_spec(meta["backbone"]).head_path
    rows = []
    for alpha in alphas:
        variables = interpolate(pretrained, finetuned, alpha, keep=head)
        row = {"alpha": alpha, "val_top1": metrics(run(variables, data.val)[0])["top1"]}
        if target is not None:
            row["target_val_top1"] = metrics(run(variables, target.val)[0])["top1"]
        rows.append(row)
    result = {"checkpoint": str(args.checkpoint), "data": args.data, "target_data": args.target_data,
              "head": HEAD_KEPT, "wise_ft": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"WiSE-FT sweep of {args.checkpoint} ({meta['backbone']}; head: {HEAD_KEPT}); validation top-1")
    print(f"  {'alpha':>5}  {args.data:>14}" + (f"  {args.target_data:>16}" if target is not None else ""))
    for row in rows:
        print(f"  {row['alpha']:>5.2f}  {row['val_top1']:>14.4f}"
              + (f"  {row['target_val_top1']:>16.4f}" if target is not None else ""))
    return 0


def _concat(a, b):
    from jaxtl.data.sources import Source

    class Both(Source):
        def __init__(self):
            self.class_names = a.class_names
            self.labels = np.concatenate([a.labels, b.labels])

        def image(self, i):
            return a.image(i) if i < len(a) else b.image(i - len(a))

        def describe(self, i):
            return a.describe(i) if i < len(a) else b.describe(i - len(a))

    return Both()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(evaluate, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
