"""What a fine-tuning request must satisfy beyond its schema, each problem a 422 naming its field.

An offered base model, or one of the tenant's fine-tuned models or checkpoints to continue from (another
tenant's, or an unknown ft: id, is a 404 like any model that does not exist for you); files of this tenant
holding training data; a hub dataset from settings.allowed_datasets that is not also a path on this machine;
sizes within the operator's caps; LoRA target modules the base model has.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from gateway import owned
from gateway.catalog import find_model
from gateway.errors import ModelNotFound
from shared.base_models import lora_targets
from shared.fine_tuning import HubDataset, Hyperparameters
from shared.schemas import FineTuningJobRequest
from shared.settings import Settings

Loc = tuple[str | int, ...]


def check_fine_tuning_request(
    body: FineTuningJobRequest, session: Session, settings: Settings, tenant: str
) -> tuple[HubDataset | None, str]:
    """The hub dataset the job trains on (None for a training file) and the base model it runs on;
    RequestValidationError listing every problem otherwise (ModelNotFound for an ft: id not of this tenant)."""
    problems: list[tuple[Loc, str]] = []
    base_model = starting_model(body.model, session, settings, tenant)
    if base_model is None:
        offered = ", ".join(repr(m) for m in settings.base_models)
        problems.append((("model",), f"model {body.model!r} is not available for fine-tuning (offered: {offered})"))
    for field in ("training_file", "validation_file"):
        file_id = getattr(body, field)
        row = owned.file(session, tenant, file_id) if file_id is not None else None
        if file_id is not None and row is None:
            problems.append(((field,), f"file {file_id!r} not found"))
        elif row is not None and row.purpose != "fine-tune":
            problems.append(((field,), f"file {file_id!r} is not training data (purpose {row.purpose!r})"))
    dataset = None
    if body.training_file is None:
        dataset, dataset_problems = _dataset(body.dataset, settings)
        problems += dataset_problems
    hp_loc: Loc = ("method", "supervised", "hyperparameters") if body.method is not None else ("hyperparameters",)
    hp = body.chosen_hyperparameters()
    problems += [((*hp_loc, *loc), message) for loc, message in _hyperparameter_problems(hp, settings)]
    if base_model is not None and base_model == body.model:
        problems += [((*hp_loc, *loc), message) for loc, message in _target_module_problems(hp, body.model)]
    if problems:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": None} for loc, msg in problems]
        )
    assert base_model is not None
    return dataset, base_model


def starting_model(model: str, session: Session, settings: Settings, tenant: str) -> str | None:
    """The base model a fine-tune of `model` runs on: the model itself when it is an offered base, the root
    of one of the tenant's fine-tuned models or checkpoints (training continues from its adapter), None for
    any other name; ModelNotFound (404) for an ft: id that is not the tenant's."""
    if model in settings.base_models:
        return model
    found = find_model(session, settings, tenant, model)
    if found is None and model.startswith("ft:"):
        raise ModelNotFound(f"model {model!r} does not exist")
    return found.root if found is not None else None


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
