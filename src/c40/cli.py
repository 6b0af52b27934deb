"""`c40` command line: summary, train, eval, report, predict, export, download.

Every `C40Error` (bad data, flags, checkpoints) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from c40.errors import C40Error


def _cmd_summary(args: argparse.Namespace) -> int:
    from c40.model import create_model
    from c40.receptive import format_summary, summarize

    s = summarize(create_model(args.arch, dropout=args.dropout, width=args.width), args.arch)
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "layers"} | {"width": args.width}))
    else:
        print(format_summary(s))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from c40.config import config_from_args
    from c40.model import create_model
    from c40.receptive import summarize
    from c40.train import fit

    cfg = config_from_args(args)
    s = summarize(create_model(cfg.arch, dropout=cfg.dropout, width=cfg.width), cfg.arch)
    print(f"c40 train: recipe={cfg.recipe} arch={cfg.arch} params={s['params']:,} "
          f"RF={s['receptive_field']} FLOPs/image={s['flops_per_image'] / 1e6:.1f}M "
          f"epochs={cfg.epochs} out={cfg.out}", flush=True)
    result = fit(cfg, progress=not args.no_progress)
    print(f"final test accuracy: {result.accuracy:.4f} ({result.accuracy * 100:.2f}%) "
          f"after {result.epochs} epochs, {result.seconds:.1f} s; checkpoint: "
          f"{result.out / 'checkpoint.pt'}")
    return 0


def _tta_text(mode: str) -> str:
    return "" if mode == "off" else f" with {mode} TTA"


def _eval_corruptions(args: argparse.Namespace) -> int:
    from c40.inference import evaluate_corruptions

    res = evaluate_corruptions(args.checkpoint, data=args.data, tta=args.tta, device=args.device)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), **res}))
        return 0
    print(f"clean accuracy {res['clean']:.4f}{_tta_text(res['tta'])}; "
          "accuracy (change in points) at severity 1..5:")
    for name, r in res["corruptions"].items():
        cells = "  ".join(f"{r['param']} {lv:g}: {a:.4f} ({-d * 100:+.1f})"
                          for lv, a, d in zip(r["levels"], r["accuracy"], r["drop"]))
        print(f"  {name:<10} {cells}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.corruptions:
        return _eval_corruptions(args)
    from c40.inference import describe, evaluate_checkpoint, run_tta

    ev, state = evaluate_checkpoint(args.checkpoint, data=args.data, tta=args.tta,
                                    device=args.device)
    used_tta = run_tta(state, args.tta)
    if args.json:
        print(json.dumps(describe(ev, state, args.checkpoint, tta=used_tta)))
    else:
        print(f"{state['config']['arch']}: accuracy {ev.accuracy:.4f} on {ev.n} test images"
              f"{_tta_text(used_tta)} "
              f"(top-5 {ev.topk_accuracy(5):.4f}, loss {ev.loss:.4f}, "
              f"params {state['params']:,})")
        for name, acc in zip(ev.classes, ev.per_class_accuracy()):
            print(f"  {name:<12} {acc:.4f}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from c40.inference import report_checkpoint

    files = report_checkpoint(args.checkpoint, args.out, data=args.data, tta=args.tta,
                              device=args.device, metrics=args.metrics)
    print(f"report written to {files['report']} ({len(files)} files)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from c40.imagefolder import open_image, to_input
    from c40.inference import predict_checkpoint

    images = [open_image(p) for p in args.images]
    for path, im in zip(args.images, images):
        note = to_input(im)[1]
        if note:
            print(f"c40 predict: note: {path}: {note}", file=sys.stderr)
    for path, p in zip(args.images, predict_checkpoint(args.checkpoint, images,
                                                       device=args.device)):
        print(f"{path}\t{p.label}\t{p.confidence:.4f}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from c40.inference import export_checkpoint

    print(f"exported {export_checkpoint(args.checkpoint, args.format, args.out)}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from c40.data import download_cifar10

    print(f"CIFAR-10 is in {download_cifar10(args.root)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from c40.config import TTA_MODES, TrainConfig, add_config_flags, add_tta_flags
    from c40.inference import EXPORT_FORMATS
    from c40.model import list_models

    p = argparse.ArgumentParser(prog="c40", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summary", help="per-layer table, parameters, receptive field, rule checks")
    s.add_argument("--arch", default=TrainConfig.arch, choices=list_models(),
                   help=f"default: {TrainConfig.arch}, the default recipe's")
    s.add_argument("--width", type=float, default=1.0)
    s.add_argument("--dropout", type=float, default=0.0)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_cmd_summary)

    t = sub.add_parser("train", help="train a model (default: the fast recipe)")
    add_config_flags(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="test accuracy of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", default=None)
    e.add_argument("--device", default="auto")
    tta_help = (f"test-time augmentation: {' | '.join(TTA_MODES)} (bare --tta: flip; default: "
                "what the training run evaluated with)")
    add_tta_flags(e, tta_help)
    e.add_argument("--corruptions", action="store_true",
                   help="also test under JPEG compression, blur, noise and brightness at five "
                        "severities each (c40.corruptions)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("report", help="figures, predictions.parquet and summary of a checkpoint")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", required=True, help="folder for the report files")
    r.add_argument("--metrics", default=None, help="metrics.jsonl for the training curves "
                   "(default: the history saved in the checkpoint)")
    r.add_argument("--data", default=None)
    r.add_argument("--device", default="auto")
    add_tta_flags(r, tta_help)
    r.set_defaults(func=_cmd_report)

    pr = sub.add_parser("predict", help="class and confidence of image files (resized to 32x32)")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--device", default="auto")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.set_defaults(func=_cmd_predict)

    x = sub.add_parser("export", help="write the model as a torch.export program (.pt2), ONNX, "
                       "TorchScript or a weights-only checkpoint")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--format", default="pt2", choices=list(EXPORT_FORMATS),
                   help="pt2 (default; torch.export.load), onnx (needs c40[onnx]), torchscript, weights")
    x.add_argument("--out", required=True, help="output file")
    x.set_defaults(func=_cmd_export)

    d = sub.add_parser("download", help="fetch CIFAR-10 (md5-checked) into ROOT")
    d.add_argument("--root", default="data")
    d.set_defaults(func=_cmd_download)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except C40Error as e:
        print(f"c40 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"c40 {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `c40 eval ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
        return 0
