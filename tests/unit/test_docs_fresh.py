"""docs/api.md and the chart's README are generated (`make docs`): the committed files must be
what it writes, and what it writes must hold everything its sources say."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tramontane import cli
from tramontane.api.crd import all_crds
from tramontane.docs import render_chart_readme, value_descriptions

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tramontane"
HINT = (
    "is stale: run `make docs` (PYTHONPATH=operator .venv/bin/python -m tramontane.cli docs) "
    "and commit the result"
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    argv = ["docs", "--api", str(out / "api.md"), "--chart", str(CHART)]
    assert cli.main([*argv, "--chart-readme", str(out / "README.md")]) == 0
    return out


@pytest.mark.parametrize(
    ("committed", "name"), [("docs/api.md", "api.md"), ("charts/tramontane/README.md", "README.md")]
)
def test_committed_docs_match_the_code(generated: Path, committed: str, name: str) -> None:
    path = ROOT / committed
    assert path.exists(), f"{committed} is missing: run `make docs` and commit it"
    assert path.read_text() == (generated / name).read_text(), f"{committed} {HINT}"


def _words(text: str) -> str:
    return " ".join(text.split())


def _schema_texts(node: Any) -> Iterator[str]:
    """Every description, CEL rule and CEL message anywhere in a CRD."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"description", "rule", "message"} and isinstance(value, str):
                yield value
            else:
                yield from _schema_texts(value)
    elif isinstance(node, list):
        for item in node:
            yield from _schema_texts(item)


def test_api_reference_holds_every_description_and_rule(generated: Path) -> None:
    # Undo the Markdown escapes: table pipes, and `<`/`*` outside code spans.
    text = (generated / "api.md").read_text()
    text = _words(text.replace("\\|", "|").replace("&lt;", "<").replace("\\*", "*"))
    missing = [
        snippet
        for crd in all_crds().values()
        for snippet in _schema_texts(crd["spec"]["versions"])
        if _words(snippet) not in text
    ]
    assert not missing, f"not in docs/api.md: {missing}"


def test_api_reference_has_a_section_per_kind(generated: Path) -> None:
    text = (generated / "api.md").read_text()
    for crd in all_crds().values():
        assert f"\n## {crd['spec']['names']['kind']}\n" in text


def test_value_descriptions_read_helm_docs_comments() -> None:
    values = """\
# A header that documents nothing.

# -- The first value,
# over two lines.
first: 1
group:
  # Not a `# --` comment.
  plain: true
  # -- Documented.
  nested: {a: 1}
"""
    assert value_descriptions(values) == {
        "first": "The first value, over two lines.",
        "group": None,
        "group.plain": None,
        "group.nested": "Documented.",
    }


def test_chart_readme_lists_documented_values_with_type_and_default() -> None:
    chart = "name: demo\ndescription: A demo.\nversion: 1.2.3\nappVersion: '4.5'\n"
    values = '# -- Image, with <tag> | digest.\nimage: ""\nplain: 3\n# -- Sizes.\nsizes: {cpu: 2}\n'
    readme = render_chart_readme(chart, values)
    assert "# demo\n\nA demo.\n\nVersion 1.2.3 · app version 4.5\n" in readme
    assert '| `image` | string | `""` | Image, with &lt;tag> \\| digest. |' in readme
    assert '| `sizes` | object | `{"cpu": 2}` | Sizes. |' in readme
    assert "`plain`" not in readme
