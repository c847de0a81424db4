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


Time = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("join_key_hash", sa.String(64)))
    op.create_table(
        "submit_keys",
        sa.Column("principal", sa.String(64), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_submit_keys_job_id_jobs"
        ),
        sa.PrimaryKeyConstraint("principal", "key", name="pk_submit_keys"),
    )


def downgrade() -> None:
    op.drop_table("submit_keys")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("join_key_hash")
