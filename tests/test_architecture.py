"""The module layering in docs/architecture.md is the code's: every runtime import of a
knnstore module is one the table allows, and only of a lower layer (so no cycle); a
type-only import (``if TYPE_CHECKING:``) never names a module of its own layer or above."""

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


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """knnstore modules that ``path`` imports when it runs (function-level imports
    included), and those it imports for type hints only (``if TYPE_CHECKING:``)."""
    runtime: set[str] = set()
    typing: set[str] = set()

    def visit(node, type_only: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                visit(child, True)
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                names = [child.module.split(".")[0]] if child.module else [a.name for a in child.names]
                (typing if type_only else runtime).update(names)
            visit(child, type_only)

    visit(ast.parse(path.read_text()), False)
    return runtime - {path.stem}, typing - {path.stem}


def _runtime_imports(path: Path) -> set[str]:
    return _imports(path)[0]


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


def test_type_hints_never_name_a_module_above():
    table = _table()
    for module, (layer, _) in table.items():
        above = {m for m in _imports(ROOT / "knnstore" / f"{module}.py")[1] if table[m][0] >= layer}
        assert not above, f"{module} (layer {layer}) imports {sorted(above)} for type hints: of its layer or above"



def test_each_knn_setting_is_declared_once_and_read_by_the_cli_and_the_server():
    import dataclasses

    from knnstore.cli import cli
    from knnstore.config import KNNSettings, settings_of
    from knnstore.server import KNNFields

    declared = settings_of(KNNSettings)
    assert [f.name for f, _ in declared] == [f.name for f in dataclasses.fields(KNNSettings)]
    def options(command: str) -> set[str]:
        return {name for p in cli.commands[command].params for name in p.opts}

    requests = {f.alias or name for name, f in KNNFields.model_fields.items()}
    for f, setting in declared:
        assert setting.option in options("generate"), f"generate has no {setting.option}"
        assert setting.option in options("serve"), f"serve has no {setting.option}"
        # a setting of decoding only is no option of the commands that score a text
        assert (setting.option in options("eval")) != setting.decoding, f"eval and {setting.option}"
        assert (setting.option in options("explain")) != setting.decoding, f"explain and {setting.option}"
        assert setting.request is None or setting.request in requests, f"requests have no {setting.request}"
