"""objects, replicas, transfer grants, job outputs, fleet scaling votes

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Time = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "objects",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("name", sa.String(1000)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("durable_url", sa.String(2000)),
        sa.Column("staged_on", sa.String(64)),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_objects"),
    )
    op.create_table(
        "replicas",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("delivered_at", Time),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("reason", sa.Text),
        sa.PrimaryKeyConstraint("sha256", "instance_id", name="pk_replicas"),
        sa.ForeignKeyConstraint(["sha256"], ["objects.sha256"], name="fk_replicas_sha256_objects"),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"],
                                name="fk_replicas_instance_id_instances"),
    )
    op.create_index("ix_replicas_instance_id_state", "replicas", ["instance_id", "state"])
    op.create_index("ix_replicas_state", "replicas", ["state"])
    op.create_table(
        "grants",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("recipient_id", sa.String(64)),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("expires_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name="pk_grants"),
    )
    op.create_index("ix_grants_expires_at", "grants", ["expires_at"])
    op.create_table(
        "job_outputs",
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "path", name="pk_job_outputs"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_outputs_job_id_jobs",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["sha256"], ["objects.sha256"],
                                name="fk_job_outputs_sha256_objects"),
    )
    op.create_table(
        "fleet_scaling",
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(8)),
        sa.Column("count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("fleet", name="pk_fleet_scaling"),
        sa.ForeignKeyConstraint(["fleet"], ["fleets.name"], name="fk_fleet_scaling_fleet_fleets"),
    )


def downgrade() -> None:
    for table in ("fleet_scaling", "job_outputs", "grants", "replicas", "objects"):
        op.drop_table(table)
