"""`finetune models [PATTERN] [--pretrained]`: list timm backbones and which have offline weights."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list timm backbones (and which have offline weights)")
    p.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'resnet*' or 'lite0' (default: all)")
    p.add_argument("--pretrained", action="store_true", help="only backbones with timm hub or offline weights")
    p.set_defaults(func=run)


def run(args) -> int:
    import timm

    from finetune.models import list_offline_weights

    pattern = args.pattern if any(c in args.pattern for c in "*?[") else f"*{args.pattern}*"
    names = set(timm.list_models(pattern))
    offline = set(list_offline_weights())
    hub = set(timm.list_models(pattern, pretrained=True)) if args.pretrained else set()
    if args.pretrained:
        hub = {n.split(".")[0] for n in hub}
        names = (names & hub) | {n for n in offline if n in names}
    if not names:
        print(f"no timm backbone matches '{args.pattern}'")
        return 1
    for name in sorted(names):
        print(f"{name:40s} {'offline weights' if name in offline else ''}".rstrip())
    return 0
