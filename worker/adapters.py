"""LoRA adapters on the one base model of a generate worker: loaded on demand, least recently used out.

peft lets one forward pass run each row of a batch through a different adapter (`adapter_names`,
"__base__" for none), so jobs for different fine-tunes of the same base share a batch. An adapter is
loaded from this host's disk cache (worker/adapter_cache.py), which fetches it from the artifact store
on first use.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

from peft import PeftModel

from worker.adapter_cache import AdapterDiskCache, StoredAdapter
from worker.model_loading import LoadedModel

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class UnsafeAdapter(ValueError):
    """An adapter folder without safetensors weights (pickled .bin weights are never loaded)."""


def adapter_name(model_id: str) -> str:
    """A peft-safe adapter name for a model id (peft names are module keys: no dots)."""
    return "ft_" + "".join(c if c.isalnum() else "_" for c in model_id)


class AdapterCache:
    """The adapters loaded on a base model, at most `capacity`, evicting the least recently used."""

    def __init__(self, loaded: LoadedModel, capacity: int, disk: AdapterDiskCache) -> None:
        self.loaded = loaded
        self.capacity = capacity
        self.disk = disk
        self._lru: OrderedDict[str, str] = OrderedDict()  # model id -> adapter name
        self.loads = 0  # adapters loaded and unloaded by this process (worker/metrics.py serves them)
        self.unloads = 0

    @property
    def names(self) -> list[str]:
        """Model ids of the adapters loaded now, least recently used first."""
        return list(self._lru)

    def ensure(self, folders: Mapping[str, StoredAdapter]) -> dict[str, str]:
        """Loads every adapter of this batch that is not loaded yet; model id -> adapter name.

        Adapters this batch needs are never evicted for each other, so a batch may briefly hold more
        than capacity. Raises the error of the first adapter that fails to load.
        """
        names, failures = self.load_each(folders)
        if failures:
            raise next(iter(failures.values()))
        return names

    def load_each(self, folders: Mapping[str, StoredAdapter]) -> tuple[dict[str, str], dict[str, Exception]]:
        """As ensure, but an adapter that fails to load is left out: (model id -> adapter name of those loaded,
        model id -> error of those that failed), so one broken adapter fails only the jobs that name it."""
        failures: dict[str, Exception] = {}
        for model_id, folder in folders.items():
            if model_id in self._lru:
                self._lru.move_to_end(model_id)
                continue
            try:
                self._load(model_id, folder)
            except Exception as exc:
                log.exception("could not load adapter %s", model_id)
                failures[model_id] = exc
                self._forget_half_loaded(adapter_name(model_id))
        while len(self._lru) > self.capacity:
            victim = next((m for m in self._lru if m not in folders), None)
            if victim is None:
                break
            self._unload(victim)
        return {model_id: self._lru[model_id] for model_id in folders if model_id not in failures}, failures

    def _forget_half_loaded(self, name: str) -> None:
        """Removes what a failed load may have left registered under this adapter name."""
        model = self.loaded.model
        if isinstance(model, PeftModel) and name in model.peft_config:
            try:
                model.delete_adapter(name)
            except Exception:
                log.exception("could not remove the half-loaded adapter %s", name)

    def _load(self, model_id: str, stored: StoredAdapter) -> None:
        if stored.files is not None and "adapter_model.safetensors" not in stored.files:
            raise UnsafeAdapter(f"adapter {model_id!r} has no adapter_model.safetensors")
        name = adapter_name(model_id)
        with self.disk.local_copy(stored) as folder:
            if not (folder / "adapter_model.safetensors").is_file():
                raise UnsafeAdapter(f"adapter {model_id!r} has no adapter_model.safetensors")
            model = self.loaded.model
            if isinstance(model, PeftModel):
                model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            else:
                self.loaded.model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
        self.loaded.model.eval()
        self._lru[model_id] = name
        self.loads += 1
        log.info("loaded adapter %s", model_id)

    def _unload(self, model_id: str) -> None:
        name = self._lru.pop(model_id)
        self.loaded.model.delete_adapter(name)
        self.unloads += 1
        log.info("unloaded adapter %s", model_id)
