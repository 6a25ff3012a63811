"""HTTP routes, one module per API area; :data:`ROUTERS` lists them for the app."""

from . import chat, completions, health, models, tokenize

ROUTERS = (chat.router, completions.router, models.router, tokenize.router, health.router)
