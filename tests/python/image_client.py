"""Drives a worker container's default command over gRPC, as a pod's clients and probes would.

Usage: python image_client.py STUBS_DIR ADDRESS STARTED_AT_EPOCH_SECONDS MODEL

Waits for the health of `jhakaas.worker.v1.Worker` to turn SERVING (the readiness probe's
question), prints how long that took from STARTED_AT, checks ListModels shows MODEL loaded as
the default, runs one Generate to completion and prints `image client OK`. Exits non-zero on
any deviation. Needs grpcio and grpcio-health-checking.
"""
import sys
import time

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from generate_stream import generate  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from jhakaas.worker.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402


def wait_serving(channel: grpc.Channel, started_at: float, timeout: float = 120.0) -> float:
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="jhakaas.worker.v1.Worker")
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            status = health.Check(request, timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return time.time() - started_at
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as e:
            last = e.code()
        time.sleep(0.05)
    raise AssertionError(f"not SERVING after {timeout}s (last: {last})")


def main(stubs: str, address: str, started_at: float, model: str) -> None:
    del stubs
    with grpc.insecure_channel(address) as channel:
        ready = wait_serving(channel, started_at)
        print(f"SERVING after {ready:.2f} s")
        stub = worker_pb2_grpc.WorkerStub(channel)
        models = stub.ListModels(worker_pb2.ListModelsRequest()).models
        assert models and models[0].name == model and models[0].loaded, models

        request = worker_pb2.GenerateRequest(prompt="a red cube in a container", steps=3, seed=11)
        kinds, completed = generate(stub, request, timeout=120)
        assert kinds[-1] == "completed" and kinds.count("progress") == 3, kinds
        images = list(completed.images)
        assert len(images) == 1 and images[0].data[:8] == b"\x89PNG\r\n\x1a\n", images
        assert images[0].seed == 11, images[0].seed
    print("image client OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
