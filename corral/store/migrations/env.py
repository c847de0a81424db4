"""Alembic environment: corral always hands it an open connection (see store.migrate)."""

from alembic import context

from corral.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "corral migrations run through `corral server` (store.migrate), not bare alembic"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
