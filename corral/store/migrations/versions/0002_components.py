"""components, rollouts, desired versions and per-instance component state

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Time = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "components",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("scheme", sa.String(16), nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="pk_components"),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer, sa.Identity()),
        sa.Column("component", sa.String(64), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("previous_version", sa.String(128)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("max_unavailable", sa.Integer, nullable=False),
        sa.Column("failure_threshold", sa.Integer, nullable=False),
        sa.Column("allow_downgrade", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("message", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "desired_components",
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("component", sa.String(64), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("rollout_id", sa.Integer, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("fleet", "component", name="pk_desired_components"),
    )
    op.create_table(
        "instance_components",
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("component", sa.String(64), nullable=False),
        sa.Column("observed_version", sa.String(128)),
        sa.Column("observed_sha256", sa.String(64)),
        sa.Column("target_version", sa.String(128)),
        sa.Column("target_sha256", sa.String(64)),
        sa.Column("rollout_id", sa.Integer),
        sa.Column("allow_downgrade", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("orders_total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", Time, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("instance_id", "component", name="pk_instance_components"),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"],
                                name="fk_instance_components_instance_id_instances"),
    )


def downgrade() -> None:
    for table in ("instance_components", "desired_components", "rollouts", "components"):
        op.drop_table(table)
