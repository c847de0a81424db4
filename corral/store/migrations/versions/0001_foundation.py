"""foundation: servers, fleets, instances, jobs, attempts, logs, events, tokens

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Time = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "servers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("build_version", sa.String(100), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("url", sa.String(500)),
        sa.Column("started_at", Time, nullable=False),
        sa.Column("last_seen_at", Time, nullable=False),
        sa.Column("stopped_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_servers"),
    )
    op.create_table(
        "fleets",
        sa.Column("name", sa.String(64)),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("min_size", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_size", sa.Integer, nullable=False, server_default="0"),
        sa.Column("target_size", sa.Integer, nullable=False, server_default="0"),
        sa.Column("idle_timeout", Time, nullable=False, server_default="300"),
        sa.Column("cpus", sa.Float, nullable=True),
        sa.Column("memory_mb", sa.Integer, nullable=True),
        sa.Column("spec", sa.JSON, nullable=False, server_default="{}"),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_fleets"),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.String(64)),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("fleet", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("incarnation", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cpus", sa.Float, nullable=False, server_default="0"),
        sa.Column("memory_mb", sa.Integer, nullable=False, server_default="0"),
        sa.Column("host", sa.String(255)),
        sa.Column("peer_url", sa.String(500)),
        sa.Column("agent_version", sa.String(100)),
        sa.Column("backend_ref", sa.String(255)),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("registered_at", Time),
        sa.Column("last_heartbeat_at", Time),
        sa.Column("lost_at", Time),
        sa.Column("drain_requested_at", Time),
        sa.Column("drain_force", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("retired_at", Time),
        sa.Column("terminated_at", Time),
        sa.Column("message", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("name", name="uq_instances_name"),
        sa.ForeignKeyConstraint(["fleet"], ["fleets.name"], name="fk_instances_fleet_fleets"),
    )
    op.create_index("ix_instances_state", "instances", ["state"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, sa.Identity()),
        sa.Column("name", sa.String(200)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("command", sa.JSON, nullable=False),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("fleet", sa.String(64)),
        sa.Column("cpus", sa.Float, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("current_attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("instance_id", sa.String(64)),
        sa.Column("exit_code", sa.Integer),
        sa.Column("reason", sa.Text),
        sa.Column("result_attempt", sa.Integer),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("started_at", Time),
        sa.Column("finished_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_state_id", "jobs", ["state", "id"])
    op.create_table(
        "job_attempts",
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64)),
        sa.Column("cpus", sa.Float, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("delivered_at", Time),
        sa.Column("started_at", Time),
        sa.Column("finished_at", Time),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("reason", sa.Text),
        sa.PrimaryKeyConstraint("job_id", "number", name="pk_job_attempts"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_attempts_job_id_jobs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name="fk_job_attempts_instance_id_instances"
        ),
    )
    op.create_index(
        "ix_job_attempts_instance_id_state", "job_attempts", ["instance_id", "state"]
    )
    op.create_index("ix_job_attempts_state", "job_attempts", ["state"])
    op.create_table(
        "log_chunks",
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("stream", sa.String(3), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "attempt", "seq", name="pk_log_chunks"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_log_chunks_job_id_jobs", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, sa.Identity()),
        sa.Column("ts", Time, nullable=False),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("job_id", sa.Integer),
        sa.Column("instance_id", sa.String(64)),
        sa.Column("server_id", sa.String(64)),
        sa.Column("data", sa.JSON),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_level_id", "events", ["level", "id"])
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(64)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("instance_id", sa.String(64)),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("revoked_at", Time),
        sa.Column("note", sa.String(200)),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_tokens_token_hash"),
    )


def downgrade() -> None:
    for table in (
        "tokens", "events", "log_chunks", "job_attempts", "jobs", "instances", "fleets", "servers"
    ):
        op.drop_table(table)
