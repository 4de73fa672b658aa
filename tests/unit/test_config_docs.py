"""Every config field is documented, and docs/config.md is the generated reference."""
from __future__ import annotations

import dataclasses
import os

from megatron_longlive.config.docs import field_docs, render_reference
from megatron_longlive.config.run import SECTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_field_has_a_docstring():
    missing = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               if not field_docs(cls).get(f.name)]
    assert not missing, f"fields without a docstring: {missing}"


def test_docs_config_md_is_up_to_date():
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == render_reference(), \
            "regenerate: python -m megatron_longlive.config.docs > docs/config.md"
