"""Alembic environment: runs on the connection `ledger.migrate` hands over, in its transaction."""

from alembic import context

from ledger.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
