"""Write a new Alembic revision of the catalog by comparing the models with head.

    python tools/new_migration.py "add column x to documents"

Builds a scratch SQLite catalog at the current head, then lets Alembic autogenerate
the difference between it and knnstore.catalog's models into migrations/versions/.
Read and edit the generated file before committing it.
"""

import sys
import tempfile
from pathlib import Path

from alembic import command

from knnstore import catalog


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        engine = catalog.make_engine(f"sqlite:///{Path(tmp) / 'scratch.db'}", create=True)
        catalog.upgrade(engine)
        cfg = catalog.alembic_config()
        # Write into the checkout, not into an installed copy.
        cfg.set_main_option("script_location", str(Path(__file__).parent.parent / "migrations"))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.revision(cfg, message=sys.argv[1], autogenerate=True)


if __name__ == "__main__":
    main()
