"""The modules that moved when the package was laid out by verb (docs/ARCHITECTURE.md), still importable
from their old names for one release, with a DeprecationWarning naming the new place.

A meta-path finder answers only for the old names in `MOVED` (the files are gone, so no other finder does)
with a module whose attributes are read from the new modules. Hand-written: importlib has no alias table.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED = {
    "finetune.checkpoint": ("finetune.models.checkpoint",),
    "finetune.calibration": ("finetune.inference.temperature",),
    "finetune.tta": ("finetune.inference.tta",),
    "finetune.export": ("finetune.deploy.export", "finetune.deploy.onnx"),
    "finetune.benchmark": ("finetune.deploy.benchmark",),
    "finetune.training.feature_cache": ("finetune.features.cache", "finetune.features.extract",
                                        "finetune.models.params"),
    "finetune.training.freeze": ("finetune.models.params",),
    "finetune.training.selection": ("finetune.training.best_epoch",),
    "finetune.training.distributed": ("finetune._distributed",),
    "finetune.training.cuda": ("finetune._device",),
    "finetune.evaluation.audit_report": ("finetune.audit.report",),
    "finetune.data.images": ("finetune.data.decode", "finetune.data.similarity", "finetune.data.scan",
                             "finetune.data.store"),
}
"""Old module name → the modules its public names now live in (searched in order)."""
RELEASE = "0.2"
"""The release that drops the old names."""


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module) -> None:
        targets = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {' and '.join(targets)}; the old name goes in finetune "
                      f"{RELEASE}", DeprecationWarning, stacklevel=2)

        def __getattr__(name: str):
            if name.startswith("__"):  # looked up by tools walking sys.modules: never import for those
                raise AttributeError(name)
            for target in targets:
                found = importlib.import_module(target)
                if hasattr(found, name):
                    return getattr(found, name)
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader())
        return None


def install() -> None:
    """Answer for the old names (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


def attribute_getter(module: str, names: tuple[str, ...], target: str):
    """A module-level ``__getattr__`` for ``module``, whose ``names`` moved to module ``target``: each read warns
    (DeprecationWarning) and returns the name from ``target``, imported then (it imports ``module``)."""
    def __getattr__(name: str):
        if name in names:
            warnings.warn(f"{module}.{name} moved to {target}; the old name goes in finetune {RELEASE}",
                          DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(target), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
