"""BYOI nodes: enroll your own machines as routable OpenAI-compatible capacity.

Gateway side: :mod:`.records` (secrets, records), :mod:`.store` (SQL), :mod:`.registry`
(liveness, routing hooks), :mod:`.service` (enrollment, heartbeats, admin actions),
:mod:`.routes` (``/nodes/...``), :mod:`.tunnel` (requests over the agent's WebSocket),
:mod:`.build` (recipe → all of it); trust: :mod:`.netpolicy` (node URLs and where they may
point), :mod:`.consent` (who accepts whose shared nodes, up to which price), :mod:`.inputs`
(bounds on what admins and nodes send), :mod:`.adapter` (bounded usage reports). Node
side: :mod:`.agent` (``asgi-llm node join``).
Nothing here is imported by ``import asgi_llm``.
"""
