"""Tables. Times are epoch seconds (float) so the clock can be injected everywhere."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Time = sa.Float(precision=53).with_variant(sa.Double(), "postgresql")

servers = sa.Table(
    "servers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("build_version", sa.String(100), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("url", sa.String(500)),
    sa.Column("started_at", Time, nullable=False),
    sa.Column("last_seen_at", Time, nullable=False),
    sa.Column("stopped_at", Time),
)

fleets = sa.Table(
    "fleets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
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
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("fleet", sa.String(64), sa.ForeignKey("fleets.name"), nullable=True),
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
    # the agent counts as alive until then: its last heartbeat plus the grace derived
    # from the interval it was told (heartbeat_interval); NULL: the configured grace
    sa.Column("lease_until", Time),
    sa.Column("heartbeat_interval", sa.Float),
    sa.Column("lost_at", Time),
    sa.Column("drain_requested_at", Time),
    sa.Column("drain_force", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("retired_at", Time),
    sa.Column("terminated_at", Time),
    sa.Column("message", sa.Text),
    # the backend's work on its machine (migration 0008): provisioning and stopping
    sa.Column("provision_state", sa.String(16)),
    sa.Column("provision_error", sa.Text),
    sa.Column("provision_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("provision_next_at", Time),
    sa.Column("provision_updated_at", Time),
    sa.Column("provision_server", sa.String(64)),
    sa.Column("sandbox", sa.Text),  # how its agent contains attempts (migration 0005)
    # sha256 of the key its agent joined with: a retried join is the same instance (0106)
    sa.Column("join_key_hash", sa.String(64)),
    sa.Index("ix_instances_state", "state"),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
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
    sa.Column("workdir", sa.String(64)),  # object id of its packed working dir (0005)
    sa.Column("log_limit", sa.BigInteger),  # bytes of output kept per attempt (0005)
    # name -> value sealed with the server key (`corral run --secret`, migration 0108)
    sa.Column("secret_env", sa.JSON),
    sa.Index("ix_jobs_state_id", "state", "id"),
)

# A submit's Idempotency-Key (migration 0106): a retry with the same key, from the same
# principal, is the same job; `request_sha256` tells a retry from a different request
submit_keys = sa.Table(
    "submit_keys",
    metadata,
    sa.Column("principal", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("request_sha256", sa.String(64), nullable=False),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("created_at", Time, nullable=False),
)

job_attempts = sa.Table(
    "job_attempts",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("instance_id", sa.String(64), sa.ForeignKey("instances.id"), nullable=False),
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
    # what the sandbox measured and enforced, and its notes (migration 0005)
    sa.Column("cpu_seconds", sa.Float),
    sa.Column("peak_memory_mb", sa.Integer),
    sa.Column("limits_enforced", sa.String(200)),
    sa.Column("notes", sa.JSON),
    sa.Column("log_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("ix_job_attempts_instance_id_state", "instance_id", "state"),
    sa.Index("ix_job_attempts_state", "state"),
)

log_chunks = sa.Table(
    "log_chunks",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("stream", sa.String(3), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Time, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("ts", Time, nullable=False),
    sa.Column("level", sa.String(10), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("job_id", sa.Integer),
    sa.Column("instance_id", sa.String(64)),
    sa.Column("server_id", sa.String(64)),
    sa.Column("data", sa.JSON),
    sa.Index("ix_events_level_id", "level", "id"),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # admin | join | agent
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("instance_id", sa.String(64)),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("revoked_at", Time),
    sa.Column("note", sa.String(200)),
    sa.Column("last_used_at", Time),  # migration 0108; updated at most once a minute
)

# ---- components and rollouts (migration 0002) ------------------------------------------

components = sa.Table(
    "components",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(128), primary_key=True),
    sa.Column("scheme", sa.String(16), nullable=False),
    sa.Column("url", sa.String(2000), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger),
    sa.Column("created_at", Time, nullable=False),
)

rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("component", sa.String(64), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("fleet", sa.String(64), nullable=False),  # '*': every fleet without its own
    sa.Column("previous_version", sa.String(128)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("max_unavailable", sa.Integer, nullable=False),
    sa.Column("failure_threshold", sa.Integer, nullable=False),
    sa.Column("allow_downgrade", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("message", sa.Text),
    sa.Index("ix_rollouts_state", "state"),
)

desired_components = sa.Table(
    "desired_components",
    metadata,
    sa.Column("fleet", sa.String(64), primary_key=True),
    sa.Column("component", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("rollout_id", sa.Integer, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
)

instance_components = sa.Table(
    "instance_components",
    metadata,
    sa.Column("instance_id", sa.String(64), sa.ForeignKey("instances.id"), primary_key=True),
    sa.Column("component", sa.String(64), primary_key=True),
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
)

# ---- outputs, replicas and transfers (migration 0003) -----------------------------------

objects = sa.Table(
    "objects",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("origin", sa.String(16), nullable=False),  # output | upload
    sa.Column("name", sa.String(1000)),
    sa.Column("state", sa.String(16), nullable=False),  # live | lost
    sa.Column("durable_url", sa.String(2000)),  # where the durable copy is, for people
    sa.Column("staged_on", sa.String(64)),  # server holding an upload not yet placed
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("durable_fleet", sa.String(64)),  # whose durable store holds the copy
)

offloads = sa.Table(
    "offloads",
    metadata,
    sa.Column("sha256", sa.String(64), sa.ForeignKey("objects.sha256"), primary_key=True),
    sa.Column("fleet", sa.String(64), nullable=False),  # whose durable store receives it
    sa.Column("instance_id", sa.String(64), sa.ForeignKey("instances.id"), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending | uploaded | failed
    sa.Column("created_at", Time, nullable=False),
    sa.Column("delivered_at", Time),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Index("ix_offloads_instance_id_state", "instance_id", "state"),
)

replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("sha256", sa.String(64), sa.ForeignKey("objects.sha256"), primary_key=True),
    sa.Column("instance_id", sa.String(64), sa.ForeignKey("instances.id"), primary_key=True),
    # pending|present|unverified|failed|missing|dropped
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("delivered_at", Time),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("reported_at", Time),  # its agent's own report lists it (migration 0005)
    sa.Index("ix_replicas_instance_id_state", "instance_id", "state"),
    sa.Index("ix_replicas_state", "state"),
)

grants = sa.Table(
    "grants",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("recipient_id", sa.String(64)),  # an instance, or NULL for a server
    sa.Column("created_at", Time, nullable=False),
    sa.Column("expires_at", Time, nullable=False),
    sa.Index("ix_grants_expires_at", "expires_at"),
)

job_outputs = sa.Table(
    "job_outputs",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("path", sa.String(1000), primary_key=True),
    sa.Column("sha256", sa.String(64), sa.ForeignKey("objects.sha256"), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
)

fleet_scaling = sa.Table(
    "fleet_scaling",
    metadata,
    sa.Column("fleet", sa.String(64), sa.ForeignKey("fleets.name"), primary_key=True),
    sa.Column("direction", sa.String(8)),
    sa.Column("count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", Time, nullable=False),
)
