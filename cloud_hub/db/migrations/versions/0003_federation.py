"""Federation: runs (rounds) and schedules.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federation_schedules",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("cron", sa.String(128), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("next_fire_at", sa.DateTime(), nullable=True),
        sa.Column("last_fired_at", sa.DateTime(), nullable=True),
        sa.Column("last_run_id", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("rollout_plan", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_federation_schedules_model_name", "federation_schedules", ["model_name"])
    op.create_table(
        "federation_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("parent_version", sa.String(64), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("result", sa.String(32), nullable=False),
        sa.Column("flower_run_id", sa.String(64), nullable=True),
        sa.Column("regions", sa.JSON(), nullable=False),
        sa.Column("rounds", sa.JSON(), nullable=False),
        sa.Column("initial_metrics", sa.JSON(), nullable=False),
        sa.Column("final_metrics", sa.JSON(), nullable=False),
        sa.Column("privacy", sa.JSON(), nullable=False),
        sa.Column("gate", sa.JSON(), nullable=False),
        sa.Column("result_versions", sa.JSON(), nullable=False),
        sa.Column("rollout_plan", sa.JSON(), nullable=True),
        sa.Column("rollout", sa.Text(), nullable=False),
        sa.Column(
            "schedule_id",
            sa.Integer(),
            sa.ForeignKey(
                "federation_schedules.id",
                ondelete="SET NULL",
                name="fk_federation_runs_schedule_id_federation_schedules",
            ),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_federation_runs_model_name", "federation_runs", ["model_name"])
    op.create_index("ix_federation_runs_status", "federation_runs", ["status"])
    op.create_index("ix_federation_runs_schedule_id", "federation_runs", ["schedule_id"])


def downgrade() -> None:
    op.drop_index("ix_federation_runs_schedule_id", table_name="federation_runs")
    op.drop_index("ix_federation_runs_status", table_name="federation_runs")
    op.drop_index("ix_federation_runs_model_name", table_name="federation_runs")
    op.drop_table("federation_runs")
    op.drop_index("ix_federation_schedules_model_name", table_name="federation_schedules")
    op.drop_table("federation_schedules")
