"""One request to the lab's registry, made from inside the lab manager's network namespace: the lab bridge
has no address on this machine, so ``pibake.lab.cluster`` runs ``nsenter --net ... python -m
pibake.lab.registry_probe`` and reads the answer. The request goes through the shared registry client
(``pibake.registry_client``: TLS pinned to the cluster CA, timeouts).

stdin: ``{"base", "ca", "path", "password", "timeout"}`` as JSON (the admin password never goes through an
argv; without one the request carries no credential). stdout: ``[HTTP status, JSON body]``; the status is 0
and the body the reason when nothing answered; for an error status the body is the registry's message."""

import json
import sys

from pibake.errors import RegistryClientError
from pibake.registry_client import DEFAULT_TIMEOUT, RegistryClient


def probe(spec):
    """[status, body] of ``GET spec["path"]`` (pure but for the request itself)."""
    password = spec.get("password")
    client = RegistryClient(spec["base"], spec["ca"], password=password, timeout=spec.get("timeout") or DEFAULT_TIMEOUT)
    try:
        return [200, client.call("GET", spec["path"], admin=password is not None)]
    except RegistryClientError as exc:
        return [exc.status or 0, exc.server_message or exc.reason]
    finally:
        client.close()


def main(stdin=None, stdout=None):
    spec = json.load(stdin or sys.stdin)
    (stdout or sys.stdout).write(json.dumps(probe(spec)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
