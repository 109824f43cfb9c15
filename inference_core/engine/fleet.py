"""The backends and keys of one configuration, and where each model goes; swapped whole on reload.

A request takes the fleet in force when it starts and keeps it to its end, so a reload changes
where new requests go while those in flight finish where they started.

Routing, in order:

1. A model named under ``models:`` (an alias) goes to its target, then its fallbacks.
2. Any other model goes to the first backend, in file order, that serves it: its declared
   ``models`` globs, or what its replicas list at ``/v1/models`` (refreshed with each probe).
   With a single backend, every model goes there (its own 404 is then the answer).
3. Neither: 404 ``model_not_found``.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference_core.config_file import Target
from inference_core.engine.backend import Backend
from inference_core.engine.tenants import Keys
from inference_core.errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Destination:
    """A backend to try and the model name it knows the request's model by."""

    backend: Backend
    model: str


@dataclass(frozen=True, slots=True)
class Fleet:
    #: In file order: the order in which they are asked whether they serve a model.
    backends: dict[str, Backend]
    #: Alias -> its target, then its fallbacks.
    aliases: dict[str, tuple[Target, ...]]
    default_model: str
    #: The keys clients must send (None: the API is open).
    keys: Keys | None = None

    def serves(self, model: str) -> bool:
        """Whether ``model`` is an alias or a backend is known to serve it (as no backend has listed
        its models yet, it cannot be told, and counts as served)."""
        backends = self.backends.values()
        if model in self.aliases or any(backend.serves(model) for backend in backends):
            return True
        return not any(backend.knows_models for backend in backends)

    def route(self, model: str) -> list[Destination]:
        """Where a request for ``model`` goes, first choice first."""
        chain = self.aliases.get(model)
        if chain is not None:
            return [Destination(self.backends[target.backend], target.model) for target in chain]
        if len(self.backends) == 1:
            return [Destination(next(iter(self.backends.values())), model)]
        for backend in self.backends.values():
            if backend.serves(model):
                return [Destination(backend, model)]
        raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
