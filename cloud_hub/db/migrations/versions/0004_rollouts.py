"""Rollouts: plans, waves, per-device targets and decisions; device health samples for the gates.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", sa.DateTime(), nullable=True),
        sa.Column("waves", sa.JSON(), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("baseline", sa.JSON(), nullable=True),
        sa.Column("failure", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_devices",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "rollout_id",
            sa.Integer(),
            sa.ForeignKey("rollouts.id", ondelete="CASCADE", name="fk_rollout_devices_rollout_id_rollouts"),
            nullable=False,
        ),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("previous_version", sa.String(64), nullable=True),
        sa.Column("assigned_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("rollout_id", "device_id", name="uq_rollout_devices_rollout_device"),
    )
    op.create_index("ix_rollout_devices_rollout_id", "rollout_devices", ["rollout_id"])
    op.create_table(
        "device_health",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("model_since", sa.Float(), nullable=False),
        sa.Column("model_started_at", sa.DateTime(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("escalated", sa.Integer(), nullable=False),
        sa.Column("cloud_answers", sa.Integer(), nullable=False),
        sa.Column("agreed", sa.Integer(), nullable=False),
        sa.Column("local_p99_ms", sa.Float(), nullable=True),
        sa.Column("update_error", sa.String(500), nullable=False),
    )
    op.create_index("ix_device_health_device_id", "device_health", ["device_id", "received_at"])
    op.create_index("ix_device_health_received_at", "device_health", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_device_health_received_at", table_name="device_health")
    op.drop_index("ix_device_health_device_id", table_name="device_health")
    op.drop_table("device_health")
    op.drop_index("ix_rollout_devices_rollout_id", table_name="rollout_devices")
    op.drop_table("rollout_devices")
    op.drop_index("ix_rollouts_state", table_name="rollouts")
    op.drop_table("rollouts")
