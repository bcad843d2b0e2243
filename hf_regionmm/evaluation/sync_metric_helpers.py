"""Refresh the helper copies inside the metric modules from `functional.py` (a maintainer tool).

`evaluate` copies a metric script into its cache and cannot import this package from there, so every metric file
carries verbatim copies of the `functional.py` helpers it needs, between the markers below (listed by name on the
`# names:` line). `tests/test_metrics.py` fails when a copy drifts; after editing `functional.py`, run

    python -m hf_regionmm.evaluation.sync_metric_helpers

A new metric asks for helpers with a line `# @shared: name1, name2`, which this tool expands into a marked block.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BEGIN = "# ---- Helpers copied verbatim from hf_regionmm/evaluation/functional.py"
END = "# ---- End of copied helpers."
_BLOCK = re.compile(
    r"# @shared: (.*)\n|" + re.escape(BEGIN) + r".*?\n# names: (.*?)\n.*?" + re.escape(END) + r"[^\n]*\n", re.S
)


def _segment(source: str, tree: ast.Module, name: str) -> str:
    """Source of the top-level function, class or assignment `name`, with the comment lines right above it."""
    lines = source.splitlines()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        else:
            continue
        if name in names:
            start = node.lineno - 1
            while start > 0 and lines[start - 1].startswith("#") and not lines[start - 1].startswith("# ---"):
                start -= 1
            return "\n".join(lines[start : node.end_lineno])
    raise KeyError(f"functional.py defines no top-level {name!r}")


def sync() -> list[Path]:
    """Rewrite every metric module whose copied block differs from `functional.py`; return the changed paths."""
    source = (ROOT / "functional.py").read_text()
    tree = ast.parse(source)

    def replace(match: re.Match) -> str:
        names = [n.strip() for n in (match.group(1) or match.group(2)).split(",")]
        body = "\n\n\n".join(_segment(source, tree, n) for n in names)
        return (
            f"{BEGIN} (tests/test_metrics.py checks that they\n# stay identical; edit both together).\n"
            f"# names: {', '.join(names)}\n{body}\n\n\n{END}\n"
        )

    changed = []
    for path in sorted((ROOT / "metrics").glob("*/*.py")):
        text = path.read_text()
        new = _BLOCK.sub(replace, text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for changed_path in sync():
        print("updated", changed_path)
