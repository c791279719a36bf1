"""Keys and tags from `{name}` templates, as the mapping files write them,
so that the key an application fills is the key evictd invalidates."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TemplateError(ValueError):
    """A template that names something it cannot render."""


def placeholders(template: str) -> List[str]:
    """The names a template reads, in order; a malformed one is an error."""
    names = []
    for match in _PLACEHOLDER.finditer(template):
        name = match.group(1)
        if not _NAME.match(name):
            raise TemplateError(
                f"template `{template}`: `{{{name}}}` is not a plain placeholder "
                "(a decorator's templates take `{name}` of an argument)"
            )
        names.append(name)
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise TemplateError(f"template `{template}`: an unmatched brace")
    return names


def render(template: str, values: Mapping[str, Any]) -> str:
    """`template` with each `{name}` replaced by `values[name]` as evictd
    prints it: `true`/`false` for booleans, decimal for numbers, the text
    itself for strings."""

    def one(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in values:
            raise TemplateError(f"template `{template}`: no argument `{name}`")
        return text(values[name])

    placeholders(template)
    return _PLACEHOLDER.sub(one, template)


def text(value: Any) -> str:
    """A value as evictd renders a column of it into a key."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        raise TemplateError("a key cannot be rendered from None")
    return str(value)


def render_all(templates: List[str], values: Dict[str, Any]) -> List[str]:
    return [render(template, values) for template in templates]
