"""Training: staged freezing, the loop, checkpoints, resume, DDP and the feature cache."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence


def train(
    recipe: Optional[str | Path],
    *,
    overrides: Sequence[str] = (),
    out: Optional[str | Path] = None,
    resume: Optional[str | Path] = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Run a recipe file, as ``finetune train RECIPE --set ... --out OUT`` does, and return the summary.

    Args:
        recipe: the recipe YAML (ignored when ``resume`` is given: the run's saved recipe is used).
        overrides: ``key.path=value`` strings, like ``--set``.
        out: the run folder (default: the recipe's ``output.dir``).
        resume: a run folder to continue from its last checkpoint.
        quiet: no progress bars (the epoch lines are still logged).

    Returns:
        The run's ``summary.json`` content.
    """
    from finetune.config import load_recipe  # lazy: the recipe is read before torch is imported

    if resume is not None:
        run_dir = Path(resume)
        parsed, raw = load_recipe(run_dir / "recipe.yaml")
    else:
        parsed, raw = load_recipe(recipe, list(overrides))
        run_dir = Path(out) if out is not None else Path(parsed.output.dir.format(name=parsed.name))
    from finetune.training.runner import run_training  # the heavy imports, once the recipe is valid

    return run_training(parsed, raw, run_dir=run_dir, resume=resume is not None, quiet=quiet)
