"""Alembic environment of the job ledger: run programmatically on a connection we pass in.

``omero_hwsi.jobs._db.migrate`` puts the open connection (inside its lock) into
``config.attributes["connection"]``; there is no ``alembic.ini`` and no URL here, so a password
in ``HWSI_DATABASE_URL`` never reaches a config file or a log.
"""

from __future__ import annotations

from alembic import context

from omero_hwsi.jobs.ledger import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the ledger migrations run through omero_hwsi.jobs._db.migrate only")

context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
