"""Joining a Ray cluster as cluster/ starts one: which address, whether its head wants a token, and which token.

The address is --address, else RAY_ADDRESS (as Ray's own tools read it); 'auto' is the cluster `ray start`
left on this machine. Before Ray itself is asked, the head's GCS is asked once over gRPC (a few milliseconds)
whether it answers, and whether it wants a token: Ray retries a head that refuses or is not there for tens of
seconds to minutes and then fails with a native stack trace, and a driver whose authentication mode differs
from the cluster's can hang. Every way a join can fail is one line (ClusterError) that says what to do.

    python -m data_pipeline.ray_cluster HEAD:PORT [--wait S] [--nodes N]
        prints the mode to join that head with (token or disabled): cluster/ray_worker.sh exports it as
        RAY_AUTH_MODE; --wait keeps asking while nothing answers, --nodes until N nodes are alive
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import grpc

from vqd.errors import UserError

PROBE_SECONDS = 10.0  # a head that accepts the connection but does not answer within this is refused
HEAD_HINT = "start one with cluster/ray_head.sh, or pass the head's HOST:PORT (its log prints it)"
TOKEN_HINT = ("copy the head's ~/.ray/auth_token to this machine (same path, chmod 600), or point "
              "RAY_AUTH_TOKEN_PATH at a copy")


class ClusterError(UserError):
    """A cluster that cannot be joined as asked: the message says what to do."""


class NoAnswer(ClusterError):
    """Nothing answers at the address (yet: a head may still be starting)."""


def resolve_address(address: Optional[str]) -> Optional[str]:
    """--address, else RAY_ADDRESS (also for 'auto', as ray.init reads them); None: no cluster (embedded Ray)."""
    env = os.environ.get("RAY_ADDRESS") or None
    chosen = env if address in (None, "", "auto") and env else (address or None)
    if chosen and chosen.startswith("ray://"):
        source = "--address" if chosen == address else "RAY_ADDRESS"
        raise ClusterError(
            f"{source}={chosen} is a Ray Client address, which build.py does not use (its driver reads and writes "
            f"--out itself, so it runs where that folder is mounted): run it on a cluster node, or a machine that "
            f"mounts --out, with --address HEAD:6379 (the head's GCS port, cluster/ray_head.sh's RAY_PORT)")
    return chosen


def gcs_address(address: str) -> str:
    """'auto' -> the host:port `ray start` wrote on this machine; anything else must be HOST:PORT."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            return canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise ClusterError(f"--address auto: no Ray cluster was started on this machine: {HEAD_HINT}") from None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT (e.g. node001:6379, the head's GCS port)")
    return address


def token_source() -> tuple[Optional[str], str]:
    """(token or None, where it was looked for), in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None, str(path)
    except OSError:
        return None, str(path)


def _ask(address: str, token: Optional[str], nodes: bool = False) -> tuple[str, int]:
    """One gRPC call to the GCS at host:port -> (grpc status name, alive nodes or 0), without Ray's retries."""
    from ray.core.generated import gcs_pb2, gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            if not nodes:
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_SECONDS, metadata=metadata)
                return "OK", 0
            reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=PROBE_SECONDS,
                                        metadata=metadata)
            return "OK", sum(n.state == gcs_pb2.GcsNodeInfo.ALIVE for n in reply.node_info_list)
        except grpc.RpcError as err:
            detail = (err.details() or "").rsplit("last error: ", 1)[-1]
            return f"{err.code().name}: {detail}", 0


def _unreachable(address: str, status: str) -> ClusterError:
    """The one line for a head that does not answer as a Ray GCS."""
    code, _, detail = status.partition(": ")
    if code == "DEADLINE_EXCEEDED":
        return NoAnswer(f"the Ray head at {address} did not answer within {PROBE_SECONDS:.0f} s (a firewall, "
                        f"or a host that is not the head?): {HEAD_HINT}")
    if code in ("UNAVAILABLE", "UNKNOWN") and "HTTP/2" not in detail:  # refused, unresolvable, unreachable
        lower = detail.lower()
        why = ("connection refused" if "refused" in lower else "unknown host" if "dns" in lower or "resolv" in lower
               else detail or code)
        return NoAnswer(f"no Ray head answers at {address} ({why}): {HEAD_HINT}")
    return ClusterError(f"{address} answers, but not as a Ray head's GCS port ({code}): pass the port "
                        f"cluster/ray_head.sh printed (RAY_PORT, 6379 by default)")


def join_mode(address: str) -> str:
    """The RAY_AUTH_MODE to join the head at host:port with ('token' or 'disabled'), checked against this
    machine's setting and token; ClusterError when they cannot agree."""
    wanted = (os.environ.get("RAY_AUTH_MODE") or "").lower() or None
    status, _ = _ask(address, None)
    if status == "OK":
        if wanted == "token":
            raise ClusterError(f"the Ray head at {address} runs without authentication but RAY_AUTH_MODE=token here: "
                               f"start the head with cluster/ray_head.sh (token authentication), or unset RAY_AUTH_MODE")
        return "disabled"
    if not status.startswith("UNAUTHENTICATED"):
        raise _unreachable(address, status)
    if wanted == "disabled":
        raise ClusterError(f"the Ray head at {address} requires a token but RAY_AUTH_MODE=disabled here: unset it "
                           f"and {TOKEN_HINT}")
    token, where = token_source()
    if token is None:
        raise ClusterError(f"the Ray head at {address} requires a token and there is none here ({where}): {TOKEN_HINT}")
    status, _ = _ask(address, token)
    if status.startswith("UNAUTHENTICATED"):
        raise ClusterError(f"the Ray head at {address} refused the token in {where} (another cluster's?): {TOKEN_HINT}")
    if status != "OK":
        raise _unreachable(address, status)
    return "token"


def prepare_join(address: str) -> str:
    """Resolve 'auto', check the head, and set RAY_AUTH_MODE for this process to what the head wants; the
    host:port to pass to ray.init."""
    from ray._raylet import Config

    resolved = gcs_address(address)
    os.environ["RAY_AUTH_MODE"] = join_mode(resolved)
    Config.initialize("")  # Ray reads RAY_AUTH_MODE into its config once: read it again, as ray.init itself does
    return resolved


def wait_for_head(address: str, seconds: float, nodes: int = 0) -> str:
    """join_mode, asked again while nothing answers (a head still starting) for up to `seconds`; with nodes,
    also until that many nodes are alive."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            mode = join_mode(address)
            token = token_source()[0] if mode == "token" else None
            if nodes <= 0 or _ask(address, token, nodes=True)[1] >= nodes:
                return mode
            if time.monotonic() > deadline:
                raise ClusterError(f"fewer than {nodes} Ray nodes joined the head at {address} within {seconds:.0f} s: "
                                   f"look at the workers' logs (ray_worker.sh)")
        except NoAnswer:
            if time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", help="the head's HOST:PORT (or 'auto')")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to keep asking while nothing answers")
    p.add_argument("--nodes", type=int, default=0, help="wait until this many nodes are alive")
    args = p.parse_args(argv)
    try:
        print(wait_for_head(gcs_address(args.address), args.wait, args.nodes))
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
