"""Free TCP ports on this machine: the one helper every local Ray head, test server and benchmark uses."""
from __future__ import annotations

import socket
from contextlib import ExitStack

__all__ = ["LocalRayAddresses", "free_port", "free_ports"]


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` if nothing listens there, else an ephemeral port (so notebooks and tests coexist)."""
    for port in dict.fromkeys((preferred, 0)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free TCP port on {host}")


def free_ports(names: list[str], host: str = "0.0.0.0") -> dict[str, int]:
    """Distinct free ports, one per name. Every socket stays bound until all are picked, so no two
    names get the same port (Ray binds all interfaces, hence the default host)."""
    with ExitStack() as held:
        ports = {}
        for name in names:
            s = held.enter_context(socket.socket())
            s.bind((host, 0))
            ports[name] = s.getsockname()[1]
        return ports


class LocalRayAddresses:
    """The addresses of a Ray head started on this machine, from its `ports` ("dashboard", "serve", "gcs")."""

    ports: dict[str, int]

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['serve']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"
