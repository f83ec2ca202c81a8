"""What a fine-tuning request must satisfy beyond its schema, each problem a 422 naming its field.

An offered base model; files of this tenant; a hub dataset from settings.allowed_datasets that is not also a
path on this machine; sizes within the operator's caps; LoRA target modules the base model has.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from gateway import owned
from shared.base_models import lora_targets
from shared.fine_tuning import HubDataset, Hyperparameters
from shared.schemas import FineTuningJobRequest
from shared.settings import Settings

Loc = tuple[str | int, ...]


def check_fine_tuning_request(
    body: FineTuningJobRequest, session: Session, settings: Settings, tenant: str
) -> HubDataset | None:
    """The hub dataset the job trains on (None for a training file); RequestValidationError listing every
    problem otherwise."""
    problems: list[tuple[Loc, str]] = []
    if body.model not in settings.base_models:
        offered = ", ".join(repr(m) for m in settings.base_models)
        problems.append((("model",), f"model {body.model!r} is not available for fine-tuning (offered: {offered})"))
    for field in ("training_file", "validation_file"):
        file_id = getattr(body, field)
        if file_id is not None and owned.file(session, tenant, file_id) is None:
            problems.append(((field,), f"file {file_id!r} not found"))
    dataset = None
    if body.training_file is None:
        dataset, dataset_problems = _dataset(body.dataset, settings)
        problems += dataset_problems
    hp_loc: Loc = ("method", "supervised", "hyperparameters") if body.method is not None else ("hyperparameters",)
    hp = body.chosen_hyperparameters()
    problems += [((*hp_loc, *loc), message) for loc, message in _hyperparameter_problems(hp, settings)]
    if body.model in settings.base_models:
        problems += [((*hp_loc, *loc), message) for loc, message in _target_module_problems(hp, body.model)]
    if problems:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": None} for loc, msg in problems]
        )
    return dataset


def _dataset(requested: HubDataset | None, settings: Settings) -> tuple[HubDataset | None, list[tuple[Loc, str]]]:
    if requested is None and not settings.allowed_datasets:
        return None, [(("training_file",), "required: no hub dataset is offered")]
    dataset = requested or HubDataset(name=settings.allowed_datasets[0])
    offered = ", ".join(repr(d) for d in settings.allowed_datasets) or "none"
    if dataset.name not in settings.allowed_datasets:
        return None, [(("dataset", "name"), f"dataset {dataset.name!r} is not offered (offered: {offered})")]
    if Path(dataset.name).exists():
        # The loader would read a local folder or file of that name instead of the hub's dataset.
        return None, [(("dataset", "name"), f"dataset {dataset.name!r} names a path on this machine")]
    problems: list[tuple[Loc, str]] = []
    if dataset.sample_size is not None and dataset.sample_size > settings.max_records:
        problems.append((("dataset", "sample_size"), f"must be at most {settings.max_records}"))
    return dataset, problems


def _hyperparameter_problems(hp: Hyperparameters, settings: Settings) -> list[tuple[Loc, str]]:
    caps = {
        "n_epochs": settings.max_train_epochs,
        "batch_size": settings.max_train_batch_size,
        "max_steps": settings.max_train_steps,
        "save_every_steps": settings.max_train_steps,
        "eval_every_steps": settings.max_train_steps,
    }
    problems: list[tuple[Loc, str]] = []
    for name, cap in caps.items():
        value = getattr(hp, name)
        if isinstance(value, int) and value > cap:
            problems.append(((name,), f"must be at most {cap}"))
    return problems


def _target_module_problems(hp: Hyperparameters, base_model: str) -> list[tuple[Loc, str]]:
    targets = lora_targets(base_model)
    if targets is None:
        return []  # an architecture the gateway cannot read: the worker reports unknown names
    return [
        (("target_modules", i), f"base model {base_model!r} has no module {name!r} (choose from {', '.join(targets)})")
        for i, name in enumerate(hp.target_modules)
        if name not in targets
    ]
