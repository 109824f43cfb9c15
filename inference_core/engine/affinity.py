"""Which backend and replica hold each stored response: vLLM keeps them in one replica's memory.

A ``previous_response_id`` (and every call on ``/v1/responses/{id}``) must reach the replica
that created the response, or vLLM answers that it does not exist. The map is bounded: the
least recently used ids are forgotten first, and a forgotten id is answered as unknown.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

#: (backend name, replica name)
Holder = tuple[str, str]


class AffinityStore(Protocol):
    """Where the map lives: this process (``ResponseAffinity``) or Redis, shared by every gateway."""

    async def holder_of(self, response_id: str) -> Holder | None: ...

    def remember(self, response_id: str, holder: Holder) -> None: ...

    def forget(self, response_id: str) -> None: ...


class ResponseAffinity:
    def __init__(self, size: int) -> None:
        self.size = size
        self._where: OrderedDict[str, Holder] = OrderedDict()

    def remember(self, response_id: str, holder: Holder) -> None:
        self._where[response_id] = holder
        self._where.move_to_end(response_id)
        if len(self._where) > self.size:
            self._where.popitem(last=False)

    async def holder_of(self, response_id: str) -> Holder | None:
        return self.get(response_id)

    def get(self, response_id: str) -> Holder | None:
        holder = self._where.get(response_id)
        if holder is not None:
            self._where.move_to_end(response_id)
        return holder

    def forget(self, response_id: str) -> None:
        self._where.pop(response_id, None)

    def __len__(self) -> int:
        return len(self._where)
