"""Reading a recipe: YAML with limits (size, aliases, depth), ``key.path=value`` overrides, validation
against the schema (errors name the key path, on one line), then the checks that need the model."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune.config.checks import check_against_model, check_environment
from finetune.config.schema import Recipe
from finetune.errors import FinetuneError, MAX_MESSAGE, first_line, one_line, short_repr

# ------------------------------------------------------------------------------------------- loading

MAX_RECIPE_BYTES = 1 << 20
"""Largest recipe file read (1 MiB; recipes are a few KB)."""
MAX_YAML_VALUES = 100_000
"""Most values (scalars, lists, mappings) a recipe or ``--set`` value may expand to through YAML aliases."""
MAX_YAML_DEPTH = 64
"""Deepest nesting of lists and mappings accepted, aliases expanded."""


class _RecipeYAMLError(Exception):
    """A YAML document refused before it is built: too deep, too many values, or a recursive alias."""


class _DepthLimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents nested deeper than ``MAX_YAML_DEPTH`` while composing
    (PyYAML composes recursively: a deep enough document would end in a RecursionError)."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _RecipeYAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` bounded for hostile input: aliases may expand to at most ``MAX_YAML_VALUES``
    values and ``MAX_YAML_DEPTH`` levels, and may not contain themselves.

    PyYAML builds an alias as a reference to one shared object, so a "billion laughs" document of 1 KB
    loads instantly and blows up later, whenever something walks, validates, copies or prints it. The
    composed node graph is measured first (each node once) and only then built.

    Raises:
        yaml.YAMLError: not valid YAML, or a tag the safe loader does not build.
        _RecipeYAMLError: too deep, too many values, or a recursive alias.
    """
    loader = _DepthLimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, "", 0, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _measure(node: yaml.Node, where: str, depth: int, seen: dict[int, tuple[int, int]],
             inside: set[int]) -> tuple[int, int]:
    """(values, levels) of ``node`` with aliases expanded, at ``depth`` levels below the top; ``seen``
    memoises shared (aliased) nodes, ``inside`` holds the nodes being measured (a cycle's way back)."""
    if depth > MAX_YAML_DEPTH:
        raise _RecipeYAMLError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)")
    key = id(node)
    if key in inside:
        raise _RecipeYAMLError(f"{where or '(recipe)'}: recursive alias (a value that contains itself)")
    if key in seen:
        size, height = seen[key]
    else:
        if isinstance(node, yaml.SequenceNode):
            children = [(f"{where}.{i}", child) for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            children = []
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                children += [(f"{where}.{name}", k), (f"{where}.{name}", v)]
        else:
            children = []
        inside.add(key)
        size, height = 1, 0
        for path, child in children:
            child_size, child_height = _measure(child, path.lstrip("."), depth + 1, seen, inside)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_YAML_VALUES:
                raise _RecipeYAMLError(
                    f"{where or '(recipe)'}: aliases expand to more than {MAX_YAML_VALUES:,} values")
        inside.discard(key)
        seen[key] = (size, height)
    if depth + height > MAX_YAML_DEPTH:
        raise _RecipeYAMLError(
            f"{where or '(recipe)'}: nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)")
    return size, height


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        return f"{e.problem}" + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
    return first_line(e, limit=MAX_MESSAGE)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.0.c=value`` override to the raw recipe dict; the value is parsed as YAML."""
    if "=" not in assignment:
        raise FinetuneError(f"override '{assignment}' must look like key.path=value")
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise FinetuneError(f"override {path}: {where} is not an index of a list of {len(node)}")
            key = int(key)
        elif not isinstance(node, dict):
            raise FinetuneError(f"override {path}: {'.'.join(keys[:i])} is not a section")
        if last:
            try:
                node[key] = load_yaml(value)
            except yaml.YAMLError as e:
                raise FinetuneError(one_line(f"override {path}: not valid YAML: {_yaml_problem(e)}")) from None
            except _RecipeYAMLError as e:
                raise FinetuneError(one_line(f"override {path}: {e}")) from None
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def _merge_stage_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for section in ("optimizer", "schedule"):
        default = raw.pop(section, None) or {}
        if not isinstance(default, dict):
            raise FinetuneError(f"{section}: must be a mapping")
        for stage in raw.get("stages") or []:
            if isinstance(stage, dict):
                own = stage.get(section) or {}
                if not isinstance(own, dict):
                    continue  # let the schema report it with its path
                stage[section] = {**default, **own}
    return raw


def _format_error(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("<")) or "(recipe)"  # no union tags
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        hidden = err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
        shown = "" if hidden else f" (got {short_repr(got)})"
        lines.append(f"{loc}: {msg}{shown}")
        if len(lines) > 4:
            break  # the first few are enough; the count says how many more
    more = len(e.errors()) - 1
    extra = f" (+{more} more: {'; '.join(lines[1:4])}{'; …' if more > 3 else ''})" if more else ""
    return one_line(f"{source}: {lines[0]}{extra}")


def parse_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a raw recipe dict (after overrides) into a :class:`Recipe`, then check it against the model."""
    if not isinstance(raw, dict):
        raise FinetuneError(f"{source}: a recipe must be a YAML mapping")
    try:
        recipe = Recipe.model_validate(_merge_stage_defaults(raw))
    except ValidationError as e:
        raise FinetuneError(_format_error(e, source)) from None
    check_environment(recipe, source)
    recipe._preprocessing = check_against_model(recipe, source)  # derived settings: resolved once, here
    return recipe


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> tuple[Recipe, dict[str, Any]]:
    """Read, override and validate a recipe file.

    Returns:
        ``(recipe, raw)``: the typed recipe and the resolved raw dict (as saved into the run folder).
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise FinetuneError(f"recipe not found: {path}")
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise FinetuneError(one_line(f"cannot read the recipe ({e.strerror or e}): {path}")) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise FinetuneError(f"{path}: recipe is {path.stat().st_size:,} bytes; the limit is {MAX_RECIPE_BYTES:,}")
    try:
        raw = load_yaml(data.decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path}: not UTF-8 text (byte {e.start:,})") from None
    except yaml.YAMLError as e:
        raise FinetuneError(one_line(f"{path}: not valid YAML: {_yaml_problem(e)}")) from None
    except _RecipeYAMLError as e:
        raise FinetuneError(one_line(f"{path}: {e}")) from None
    if not isinstance(raw, dict):
        raise FinetuneError(f"{path}: a recipe must be a YAML mapping")
    for assignment in overrides:
        apply_override(raw, assignment)
    recipe = parse_recipe(raw, source=str(path))
    return recipe, resolved_dict(recipe)


def resolved_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")


def resolve_raw(raw: Any, source: str = "recipe") -> dict[str, Any]:
    """A raw recipe checked by the schema alone (not against the model) and resolved like
    :func:`resolved_dict`: stage defaults merged, every default filled in. For comparing recipes."""
    if not isinstance(raw, dict):
        raise FinetuneError(f"{source}: a recipe must be a YAML mapping")
    try:
        return resolved_dict(Recipe.model_validate(_merge_stage_defaults(raw)))
    except ValidationError as e:
        raise FinetuneError(_format_error(e, source)) from None
