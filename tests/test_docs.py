"""The docs match the code: the CLI reference and the table of kNN settings are current, and the
README names every command."""

from pathlib import Path

from knnstore.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_generated_from_the_current_help():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "tools" / "gen_cli_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), "run: python tools/gen_cli_docs.py"
    assert (ROOT / "docs" / "adapter.md").read_text() == gen.render_adapter_doc(), "run: python tools/gen_cli_docs.py"


def test_readme_documents_every_command_and_both_scripts_exist():
    readme = (ROOT / "README.md").read_text()
    for name in cli.commands:
        assert f"knnstore {name}" in readme, f"README does not mention `knnstore {name}`"
    for script in ("tools/demo.sh", "tools/test.sh"):
        assert f"bash {script}" in readme and (ROOT / script).exists()
    assert "bash tools/test.sh" in (ROOT / ".ci" / "run").read_text()
