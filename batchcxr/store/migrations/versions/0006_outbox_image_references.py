"""outbox of DICOM results to send; the source references derived objects need

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 21:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images') as b:
        b.add_column(sa.Column('sop_class_uid', sa.String(length=64), nullable=False, server_default=''))
        b.add_column(sa.Column('series_instance_uid', sa.String(length=128), nullable=False, server_default=''))
        b.add_column(sa.Column('patient_orientation', sa.String(length=32), nullable=False, server_default=''))
    op.create_table(
        'outbox',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('destination', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=8), nullable=False),
        sa.Column('study_key', sa.String(length=255), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=128), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('sent_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('destination', 'sop_instance_uid', name='uq_outbox_destination_uid'),
    )
    op.create_index('ix_outbox_status_next', 'outbox', ['status', 'next_attempt_at'])


def downgrade() -> None:
    op.drop_index('ix_outbox_status_next', 'outbox')
    op.drop_table('outbox')
    with op.batch_alter_table('images') as b:
        b.drop_column('patient_orientation')
        b.drop_column('series_instance_uid')
        b.drop_column('sop_class_uid')
