"""JSON answers of the hot routes, serialized once by pydantic's own (Rust) serializer.

A route that returns a model lets FastAPI validate it again against its response_model and encode it through
jsonable_encoder; a Response built here skips both. The route still names its response_model, so the OpenAPI
schema is unchanged.
"""

from __future__ import annotations

from fastapi.responses import Response
from pydantic import BaseModel


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """The model as a JSON answer (what FastAPI's response_model serialization writes, in one pass)."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")
