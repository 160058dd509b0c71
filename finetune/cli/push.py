"""`finetune push DIR --repo OWNER/NAME [--private]`: upload a hub-format model folder to the Hugging Face Hub."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="upload a hub-format model folder (finetune export --format hub) to the Hugging Face Hub",
        description="Upload a folder `finetune export CHECKPOINT --format hub --out DIR` wrote to the Hugging Face "
                    "Hub in one commit (huggingface_hub.upload_folder), creating the repository if needed. The "
                    "token is HF_TOKEN or the Hugging Face CLI's login (`hf auth login`). Then timm.create_model("
                    "'hf-hub:OWNER/NAME', pretrained=True) (linear head) or finetune.load('hf-hub:OWNER/NAME') loads it, and finetune "
                    "predict/eval take hf-hub:OWNER/NAME as the checkpoint.",
    )
    p.add_argument("folder", metavar="DIR", help="the hub-format model folder")
    p.add_argument("--repo", required=True, metavar="OWNER/NAME", help="the model repository on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository private (when it is new)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune.deploy.hub import push_folder  # lazy: `finetune --help` imports no torch

    url = push_folder(args.folder, args.repo, private=args.private)
    print(f"pushed {args.folder} to {args.repo}: {url}")
    return 0
