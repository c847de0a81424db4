"""idempotent requests: the join key a joining agent picked (a retried registration is
the same instance); submit idempotency keys (a retried submit is the same job)

Revision ID: 0106
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0106"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("join_key_hash", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("join_key_hash")
