"""Fleet: API tokens (device tokens move out of ``devices``), escalation statistics, optional raw
payloads, runtime hub settings, and a lineage column on model versions.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("lineage", sa.JSON(), nullable=True))

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_index("ix_api_tokens_device_id", "api_tokens", ["device_id"])
    # Tokens issued at registration keep working: they become the devices' first API tokens.
    op.execute(
        "INSERT INTO api_tokens (name, role, device_id, token_hash, created_at) "
        "SELECT 'registration', 'device', device_id, token_hash, registered_at FROM devices"
    )
    with op.batch_alter_table("devices") as batch:
        batch.drop_constraint("uq_devices_token_hash", type_="unique")
        batch.drop_column("token_hash")

    op.create_table(
        "escalation_stats",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("bucket", sa.DateTime(), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("region", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("answered", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False),
        sa.UniqueConstraint(
            "bucket", "device_id", "region", "model_name", "model_version", name="uq_escalation_stats_key"
        ),
    )
    op.create_index("ix_escalation_stats_bucket", "escalation_stats", ["bucket"])

    op.create_table(
        "escalation_payloads",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("region", sa.String(128), nullable=False),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("cloud_label", sa.Integer(), nullable=True),
        sa.Column("cloud_confidence", sa.Float(), nullable=True),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_escalation_payloads_received_at", "escalation_payloads", ["received_at"])
    op.create_index("ix_escalation_payloads_device_id", "escalation_payloads", ["device_id"])

    op.create_table(
        "hub_settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("hub_settings")
    op.drop_index("ix_escalation_payloads_device_id", table_name="escalation_payloads")
    op.drop_index("ix_escalation_payloads_received_at", table_name="escalation_payloads")
    op.drop_table("escalation_payloads")
    op.drop_index("ix_escalation_stats_bucket", table_name="escalation_stats")
    op.drop_table("escalation_stats")

    # Each device gets back its newest live token; a device without one gets a hash nothing matches.
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("token_hash", sa.String(64), nullable=True))
    op.execute(
        "UPDATE devices SET token_hash = (SELECT t.token_hash FROM api_tokens t "
        "WHERE t.device_id = devices.device_id AND t.role = 'device' AND t.revoked_at IS NULL "
        "ORDER BY t.id DESC LIMIT 1)"
    )
    op.execute("UPDATE devices SET token_hash = 'revoked-' || id WHERE token_hash IS NULL")
    with op.batch_alter_table("devices") as batch:
        batch.alter_column("token_hash", existing_type=sa.String(64), nullable=False)
        batch.create_unique_constraint("uq_devices_token_hash", ["token_hash"])
    op.drop_index("ix_api_tokens_device_id", table_name="api_tokens")
    op.drop_table("api_tokens")

    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("lineage")
