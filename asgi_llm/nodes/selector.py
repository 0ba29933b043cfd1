""":class:`NodeSelector`: the recipe's ``{nodes: <selector>, model: ...}`` target.

A :class:`~asgi_llm.routing.router.NodeTargets` (the router expands it into live node
targets at request time) that also answers ``route``/``provider``/``kind`` like a
:class:`~asgi_llm.routing.router.Target`, because layers that read a model's targets
from the recipe — quota price estimates, cache keys, usage pricing — read those
attributes. Its route is ``nodes:<selector>/<model>``; a served attempt's route is the
node's own ``node:<name>@<org>/<model>``.
"""

from __future__ import annotations

from asgi_llm.targets import NodeTargets

__all__ = ["NodeSelector"]


class NodeSelector(NodeTargets):
    """A node selector target (see the module docstring)."""

    @property
    def provider(self) -> str:
        return "nodes:" + self.selector

    @property
    def route(self) -> str:
        return f"nodes:{self.selector}/{self.model}"

    @property
    def kind(self) -> str:
        return "nodes"
