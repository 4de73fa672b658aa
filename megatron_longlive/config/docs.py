"""Config reference generated from the dataclass field docstrings (the string literal under each field).

`render_reference()` returns Markdown: one table per section with field, type, default and doc. The file
docs/config.md is this output; a test keeps it in sync (`python -m megatron_longlive.config.docs > docs/config.md`).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from .run import SECTIONS


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} read from the class source (attribute docstrings are not kept at run time)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return f"`{value!r}`"


def render_reference() -> str:
    lines = ["# Config reference", "",
             "Generated from the dataclass docstrings in `megatron_longlive/config/` "
             "(`python -m megatron_longlive.config.docs > docs/config.md`). Every field can be set in a YAML "
             "file under its section or on the command line with `--set section.field=value`.", ""]
    for section, cls in SECTIONS.items():
        lines += [f"## `{section}`", "", " ".join((cls.__doc__ or "").split()), "",
                  "| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        docs = field_docs(cls)
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            typ = str(hints[f.name]).replace("|", "or")
            lines.append(f"| `{f.name}` | `{typ}` | {_default(f).replace('|', 'or')} | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_reference(), end="")
