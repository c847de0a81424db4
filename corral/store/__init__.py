"""Persistence: SQLAlchemy Core tables, Alembic migrations, repositories."""
