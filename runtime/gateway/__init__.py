"""The gateway: one request lifecycle over replica sets (docs/architecture.md).

- ``request.py``: the one request type, and the Generate stream's messages;
- ``replicas.py``: ``ReplicaClient`` (one replica, whatever hosts it), ``ReplicaSet`` per expert,
  dispatch and telemetry;
- ``lifecycle.py``: admit -> record -> route -> release, once for every call;
- ``generate.py``, ``cascade.py``, ``score.py``, ``images.py``: what each call does;
- ``admin.py``: the operators' façade (domain views);
- ``gateway.py``: wires them together.
"""

from .gateway import Gateway
from .request import Chunk, Final, Request

__all__ = ["Chunk", "Final", "Gateway", "Request"]
