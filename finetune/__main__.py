"""`python -m finetune` is the `finetune` command (torchrun needs the -m form)."""
import sys

from finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
