"""an instance's provisioning: state, last error, attempts, next try, which server

Revision ID: 0008
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0005"
branch_labels = None
depends_on = None

Time = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("provision_state", sa.String(16)))
        batch.add_column(sa.Column("provision_error", sa.Text))
        batch.add_column(
            sa.Column("provision_attempts", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("provision_next_at", Time))
        batch.add_column(sa.Column("provision_updated_at", Time))
        batch.add_column(sa.Column("provision_server", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        for name in (
            "provision_server",
            "provision_updated_at",
            "provision_next_at",
            "provision_attempts",
            "provision_error",
            "provision_state",
        ):
            batch.drop_column(name)
