"""Recipe files (``--config recipe.yaml`` or ``.json``): a mapping of flag names to values, read with bounds.

A recipe is a page of options, so it is refused past :data:`MAX_RECIPE_BYTES` or, for YAML, past
:data:`MAX_RECIPE_VALUES` values with its aliases expanded (an alias bomb never expands); only plain YAML types are
built (``yaml.SafeLoader``). Values are checked against the options' types (:mod:`coati.config`).
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from coati.config import ALIASES, has_type, option_fields, option_hints, short_repr, type_text


#: the largest recipe file read (bytes); a recipe is a page of options
MAX_RECIPE_BYTES = 1 << 20
#: the most values (mappings, lists and scalars, YAML aliases counted each time they are used) a recipe may expand
#: to: a "billion laughs" alias bomb is refused before anything expands it
MAX_RECIPE_VALUES = 100_000


class _RecipeRefused(ValueError):
    """A recipe refused by its bounds (size, expansion, cycle): already one line naming the file."""


def _expanded_size(node, path: str, memo: dict[int, int], open_nodes: set[int]) -> int:
    """How many values a composed YAML node stands for once its aliases are expanded (aliases share node objects,
    so each node is sized once)."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        raise _RecipeRefused(f"--config {path}: a YAML alias refers to a value that contains it (a cycle)")
    open_nodes.add(key)
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, path, memo, open_nodes) + _expanded_size(v, path, memo, open_nodes)
                       for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, path, memo, open_nodes) for v in node.value)
    else:
        size = 1
    open_nodes.discard(key)
    memo[key] = min(size, MAX_RECIPE_VALUES + 1)
    return memo[key]


def _load_recipe_file(path: str) -> Any:
    """The parsed content of a recipe file, bounded: at most :data:`MAX_RECIPE_BYTES` bytes and, for YAML, at most
    :data:`MAX_RECIPE_VALUES` values with aliases expanded (checked on the composed node graph, before anything is
    built), no alias cycle. Only plain YAML types are built (``yaml.SafeLoader``: no Python tags).

    Raises:
        ValueError: one line naming the file, for an unreadable, unparsable, too large, too deep or self-referring
            file.
    """
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise _RecipeRefused(f"--config {path}: larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a mapping "
                                 "of options")
        text = raw.decode("utf-8")
        if path.endswith(".json"):
            return json.loads(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, path, {}, set()) > MAX_RECIPE_VALUES:
            raise _RecipeRefused(f"--config {path}: expands to more than {MAX_RECIPE_VALUES:,} values (YAML "
                                 "aliases reused over and over); refused")
        return yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 (SafeLoader)
    except _RecipeRefused:
        raise
    except RecursionError:
        raise ValueError(f"--config {path}: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    except (OSError, ValueError, yaml.YAMLError) as e:  # JSON's ValueErrors too (syntax, 4,300-digit integers)
        raise ValueError(f"--config {path}: cannot read it ({' '.join(str(e).split())})") from None


def read_recipe(path: str) -> dict[str, Any]:
    """The options of a recipe file (``.yaml``/``.yml`` or ``.json``: a mapping of flag names to values).

    A string given for a list option (``dataset: hh-rlhf``) becomes a one-element list; old spellings
    (``bf16: true``) are translated. A value that is not a string must have the option's type (strings are parsed
    by the flag's own parser, as on the command line).

    Raises:
        ValueError: the file cannot be read or parsed, is too large or expands too far
            (:func:`_load_recipe_file`), is not a mapping, names an unknown option, or gives an option a value of
            the wrong type (one line with the file and the name).
    """
    values = _load_recipe_file(path)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    fields, out = option_fields(), {}
    hints = option_hints()
    for name, value in values.items():
        if name in ALIASES:
            target, convert = ALIASES[name]
            out.setdefault(target, convert(value))
        elif name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            raise ValueError(f"--config {path}: unknown option {name!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        else:
            value = [value] if isinstance(value, str) and fields[name][1].metadata.get("nargs") else value
            if not isinstance(value, str) and not has_type(hints[name], value):
                raise ValueError(f"--config {path}: --{name}: must be {type_text(hints[name])}, got "
                                 f"{short_repr(value)}")
            out[name] = value
    return out
