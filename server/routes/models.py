"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..responses import ModelCard, ModelList
from ..state import ServerState, get_state
from .common import error_responses

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    """The served model under each of its served names."""
    state.check_ready()
    info = state.engine.model_info
    names = state.settings.served_model_names or (state.model_name,)
    return ModelList(
        data=[
            ModelCard(id=name, created=state.created, root=info.path, max_model_len=info.max_model_len)
            for name in names
        ]
    )
