"""The module layering in docs/architecture.md is the code's: every runtime import of a
knnstore module is one the table allows, and only of a lower layer (so no cycle)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table() -> dict[str, tuple[int, set[str]]]:
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\| (\d+) \| `(\w+)` \| .* \| (.+) \|$", line)
        if m:
            allowed = set(re.findall(r"`(\w+)`", m.group(3)))
            rows[m.group(2)] = (int(m.group(1)), allowed)
    return rows


def _runtime_imports(path: Path) -> set[str]:
    """knnstore modules that ``path`` imports when it runs (function-level imports
    included; ``if TYPE_CHECKING:`` blocks left out)."""
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                found.update([child.module.split(".")[0]] if child.module else [a.name for a in child.names])
            visit(child)

    visit(ast.parse(path.read_text()))
    return found - {path.stem}


def test_every_module_is_in_the_layering_table():
    modules = {p.stem for p in (ROOT / "knnstore").glob("*.py")}
    assert modules == set(_table()), "docs/architecture.md: the layering table and knnstore/ differ"


def test_modules_import_only_what_the_table_allows_and_only_lower_layers():
    table = _table()
    for module, (layer, allowed) in table.items():
        imported = _runtime_imports(ROOT / "knnstore" / f"{module}.py")
        assert imported <= allowed, f"{module} imports {sorted(imported - allowed)}, not in its row"
        above = {m for m in allowed if table[m][0] >= layer}
        assert not above, f"{module} (layer {layer}) may import {sorted(above)} of its own layer or above"
