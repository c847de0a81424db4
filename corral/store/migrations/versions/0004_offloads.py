"""offloads to a fleet's durable store; which store holds an object

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Time = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("objects") as batch:
        batch.add_column(sa.Column("durable_fleet", sa.String(64)))
    op.create_table(
        "offloads",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("delivered_at", Time),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("reason", sa.Text),
        sa.ForeignKeyConstraint(["sha256"], ["objects.sha256"],
                                name="fk_offloads_sha256_objects"),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"],
                                name="fk_offloads_instance_id_instances"),
        sa.PrimaryKeyConstraint("sha256", name="pk_offloads"),
    )
    op.create_index("ix_offloads_instance_id_state", "offloads", ["instance_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_offloads_instance_id_state", table_name="offloads")
    op.drop_table("offloads")
    with op.batch_alter_table("objects") as batch:
        batch.drop_column("durable_fleet")
