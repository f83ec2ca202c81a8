"""This test process's LLMQ_* settings, and forgetting the cached objects built from them."""

from __future__ import annotations

import pytest


def configure(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Sets LLMQ_* variables for this process and forgets every cached settings-derived object."""
    for key, value in env.items():
        monkeypatch.setenv(f"LLMQ_{key.upper()}", value)
    reset_caches()


def reset_caches() -> None:
    """Forgets the settings, engine, sessionmaker, Celery app and Redis client built from earlier settings."""
    from shared import celery_app, db, notify, settings

    settings.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    celery_app.get_celery.cache_clear()
    notify._client.cache_clear()
