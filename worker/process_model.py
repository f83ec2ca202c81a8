"""The one base-model holder of a generate worker process (built once per process, the model loads on first use)."""

from __future__ import annotations

from functools import lru_cache

from shared.settings import get_settings
from worker.serving import ModelHolder


@lru_cache
def generate_models() -> ModelHolder:
    """This process's base model holder (the model itself loads on first use)."""
    return ModelHolder(get_settings())
