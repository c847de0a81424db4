"""secrets at rest and credential bookkeeping: jobs.secret_env (values sealed with the
server key), tokens.last_used_at

Revision ID: 0108
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0108"
down_revision = "0106"
branch_labels = None
depends_on = None

Time = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("secret_env", sa.JSON))
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("last_used_at", Time))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("last_used_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("secret_env")
