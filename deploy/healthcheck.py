"""Container health check: ask grpc.health.v1 and exit 0 only on SERVING.

A TCP probe would call a server healthy while it still loads and warms its
models; the health service says NOT_SERVING until they are ready, so this is
what compose and Docker wait on.

    python deploy/healthcheck.py [--host 127.0.0.1] [--port 50051] [--service ""] [--timeout 3]

Exit codes: 0 SERVING, 1 any other status or no answer (Docker counts both as
a failed probe). Prints one line either way for `docker inspect`.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str, timeout: float) -> tuple[bool, str]:
    """(serving?, what was seen) for one Check call."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="server address (inside the container: loopback)")
    p.add_argument("--port", type=int, default=int(os.environ.get("SEQSERVE_PORT", "50051")),
                   help="gRPC port (default $SEQSERVE_PORT or 50051)")
    p.add_argument("--service", default="", help='health service name ("" = the whole server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)
    ok, seen = check(f"{args.host}:{args.port}", args.service, args.timeout)
    print(f"grpc.health.v1 {args.host}:{args.port} service={args.service!r}: {seen}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
