"""the attempt sandbox: what an attempt used and was allowed, its notes and log size;
a job's working dir and log limit; how an agent contains attempts; when an agent
itself reported a replica

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("sandbox", sa.Text))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("workdir", sa.String(64)))
        batch.add_column(sa.Column("log_limit", sa.BigInteger))
    with op.batch_alter_table("job_attempts") as batch:
        batch.add_column(sa.Column("cpu_seconds", sa.Float))
        batch.add_column(sa.Column("peak_memory_mb", sa.Integer))
        batch.add_column(sa.Column("limits_enforced", sa.String(200)))
        batch.add_column(sa.Column("notes", sa.JSON))
        batch.add_column(
            sa.Column("log_bytes", sa.BigInteger, nullable=False, server_default="0")
        )
    with op.batch_alter_table("replicas") as batch:
        batch.add_column(
            sa.Column("reported_at", sa.Float(precision=53).with_variant(sa.Double(), "postgresql"))
        )


def downgrade() -> None:
    with op.batch_alter_table("replicas") as batch:
        batch.drop_column("reported_at")
    with op.batch_alter_table("job_attempts") as batch:
        for c in ("log_bytes", "notes", "limits_enforced", "peak_memory_mb", "cpu_seconds"):
            batch.drop_column(c)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("log_limit")
        batch.drop_column("workdir")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("sandbox")
