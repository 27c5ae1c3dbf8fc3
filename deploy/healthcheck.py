"""Container healthcheck: exits 0 when the gRPC health service at TARGET answers SERVING, 1 otherwise.

    python healthcheck.py [TARGET]     TARGET defaults to 127.0.0.1:50051, the server inside its own container

The health service needs no token, and inside the container the server is plaintext (TLS ends at nginx).
"""

import sys

import grpc

from gptserve.service.client import GenerationClient


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else "127.0.0.1:50051"
    with GenerationClient(target, timeout=5) as client:
        try:
            status = client.health()
        except grpc.RpcError as error:
            print(f"{target}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"{target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
