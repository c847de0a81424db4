"""an instance's lease: until when its agent counts as alive, derived from the heartbeat
interval it was told

Revision ID: 0111
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0111"
down_revision = "0108"
branch_labels = None
depends_on = None

Time = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("lease_until", Time))
        batch.add_column(sa.Column("heartbeat_interval", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("heartbeat_interval")
        batch.drop_column("lease_until")
