"""Recipe files → :class:`~asgi_llm.recipe.schema.GatewayConfig`: YAML, ``${VAR}``, messages.

Environment variables are expanded *after* YAML parsing, in string values only (never in
mapping keys), so a variable's value can never change the document's structure:

* ``${VAR}`` -- the value of ``VAR``; an error if it is not set;
* ``${VAR:-default}`` -- ``default`` when ``VAR`` is unset or empty (as in the shell);
  the default may itself contain ``${OTHER}`` references and ``$$``;
* ``$$`` -- a literal ``$``; a ``$`` followed by anything else is kept as is.

Because YAML gives a string such as ``"60"`` for an expanded value, numeric and boolean
fields accept numeric strings (pydantic's lax mode).

Every problem found -- YAML syntax, expansion, unknown keys, wrong types, bad values and
cross-references -- is collected and raised together as one
:class:`~asgi_llm.recipe.schema.ConfigError`, each with the dotted path of the offending
key. Secret values are never echoed in errors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from asgi_llm.recipe.schema import (
    ConfigError,
    GatewayConfig,
    Loc,
    _convert_errors,
    _reference_problems,
    _render_loc,
    _walk,
    _yaml_type,
)

__all__ = ["config_from_dict", "load_config", "parse_config"]


# --------------------------------------------------------------------------- expansion

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Expander:
    """Expands ``${VAR}``, ``${VAR:-default}`` and ``$$`` in every string of a YAML tree."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[tuple[str, str]] = []
        self.failed_paths: list[str] = []

    def tree(self, node: Any, loc: Loc = ()) -> Any:
        if isinstance(node, str):
            return self.string(node, loc)
        if isinstance(node, dict):
            return {k: self.tree(v, loc + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [self.tree(v, loc + (i,)) for i, v in enumerate(node)]
        return node

    def string(self, text: str, loc: Loc) -> str:
        if "$" not in text:
            return text
        errors: list[str] = []
        value, _ = self._scan(text, 0, nested=False, evaluate=True, errors=errors)
        if errors:
            path = _render_loc(loc, GatewayConfig)
            self.failed_paths.append(path)
            self.problems.extend((path, e) for e in dict.fromkeys(errors))
            return ""
        return value

    def _scan(self, text: str, i: int, *, nested: bool, evaluate: bool, errors: list[str]) -> tuple[str, int]:
        """Expand from ``i``; in a default (``nested``) stop at the closing ``}``."""
        out: list[str] = []
        n = len(text)
        while i < n:
            ch = text[i]
            if nested and ch == "}":
                return "".join(out), i
            if ch != "$" or i + 1 >= n or text[i + 1] not in "${":
                out.append(ch)
                i += 1
                continue
            if text[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            start = i
            match = _NAME_RE.match(text, i + 2)
            end = match.end() if match else i + 2
            if match and text.startswith("}", end):
                name = match.group()
                i = end + 1
                if evaluate:
                    if name in self.environ:
                        out.append(self.environ[name])
                    else:
                        errors.append(f"environment variable {name} is not set "
                                      f"(use ${{{name}:-default}} for a default)")
                continue
            if match and text.startswith(":-", end):
                name = match.group()
                current = self.environ.get(name, "")
                use_default = evaluate and not current
                default, j = self._scan(text, end + 2, nested=True, evaluate=use_default, errors=errors)
                if j >= n:
                    errors.append(f"unterminated '${{{name}:-' (missing '}}')")
                    return "".join(out), n
                i = j + 1
                if evaluate:
                    out.append(default if use_default else current)
                continue
            errors.append(f"invalid variable reference at character {start + 1}: expected "
                          "${NAME} or ${NAME:-default} (write $$ for a literal $)")
            out.append(text[start:end])
            i = end
        return "".join(out), i


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys in a mapping (YAML would keep the last)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} in a mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    # Deliberately not str(exc): it quotes the offending line, which may hold a secret.
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or "invalid YAML"
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    detail = f"{context}: {problem}" if context else problem
    return ("", f"YAML syntax error{where}: {detail}")


# --------------------------------------------------------------------------- loading


def config_from_dict(
    data: Any, *, source: str = "<dict>", environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Validate an already-parsed recipe (expanding ``${VAR}`` in its strings)."""
    if not isinstance(data, dict):
        raise ConfigError([("", f"the top level must be a mapping, got {_yaml_type(data)}")], source)
    expander = _Expander(os.environ if environ is None else environ)
    expanded = expander.tree(data)
    problems = list(expander.problems)
    try:
        config = GatewayConfig.model_validate(expanded)
    except ValidationError as exc:
        failed = expander.failed_paths
        for path, message in _convert_errors(exc):
            # A value whose expansion failed was replaced by "": don't also report that "".
            if any(path == f or path.startswith((f + ".", f + "[")) for f in failed):
                continue
            problems.append((path, message))
        # The cross-reference check runs only once the schema passed: run it on the raw
        # recipe too, so one `asgi-llm check` names every problem, not half of them.
        for loc, message in _reference_problems(expanded):
            if (found := (_walk(loc)[0], message)) not in problems:
                problems.append(found)
        if not problems:  # pragma: no cover -- a validation error always yields a problem
            problems.append(("", "invalid recipe"))
        raise ConfigError(problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return config


def parse_config(
    text: str, *, source: str = "<string>", environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Parse and validate a recipe given as YAML text."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], source) from None
    if data is None:
        raise ConfigError([("", "the recipe is empty (expected a mapping with at least 'models')")], source)
    return config_from_dict(data, source=source, environ=environ)


def load_config(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, parse and validate the recipe file at ``path``."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([("", f"cannot read the recipe: {reason}")], source) from None
    return parse_config(text, source=source, environ=environ)
