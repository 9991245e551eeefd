"""A Python client of the Jhakaas worker, generated from the proto with grpcio-tools.

Usage: python worker_client.py STUBS_DIR ADDRESS

Internal clients are not all Rust: this drives a live server the way a Python service would
and exits non-zero on any deviation from the contract.
"""
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from generate_stream import generate  # noqa: E402
from jhakaas.worker.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402


def main(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)

        models = stub.ListModels(worker_pb2.ListModelsRequest()).models
        assert [m.name for m in models] == ["tiny", "xl"], models
        assert models[0].loaded, models[0]
        assert models[1].family == "sdxl" and models[1].default_guidance_scale == 5.0, models[1]

        # SDXL without guidance (<= 1) and with size conditioning.
        xl = worker_pb2.GenerateRequest(
            model="xl", prompt="a python-made lighthouse", steps=2, seed=3, guidance_scale=1.0,
            size_conditioning=worker_pb2.SizeConditioning(original_width=256, original_height=256),
        )
        last = list(stub.Generate(xl, timeout=60))[-1]
        assert last.WhichOneof("event") == "completed", last
        assert last.completed.images[0].width == 64, last.completed.images[0].width

        request = worker_pb2.GenerateRequest(prompt="a python-made cube", steps=3, seed=7, num_images=2)
        kinds, completed = generate(stub, request, timeout=60)
        assert completed is not None and completed.timings.total_seconds > 0, kinds
        images = list(completed.images)
        assert kinds[0] == "queued" and "started" in kinds, kinds
        assert kinds.count("progress") == 3 and kinds[-1] == "completed", kinds
        assert [i.seed for i in images] == [7, 8], images
        assert all(i.mime_type == "image/png" and i.data[:8] == b"\x89PNG\r\n\x1a\n" for i in images)

        job = stub.SubmitJob(worker_pb2.GenerateRequest(prompt="async", steps=2, request_id="py-1"))
        again = stub.SubmitJob(worker_pb2.GenerateRequest(prompt="async", steps=2, request_id="py-1"))
        assert job.job_id == again.job_id
        final = list(stub.WatchJob(worker_pb2.WatchJobRequest(job_id=job.job_id)))[-1]
        assert final.WhichOneof("event") == "completed", final
        assert stub.GetJob(worker_pb2.GetJobRequest(job_id=job.job_id)).state == worker_pb2.JOB_STATE_SUCCEEDED

        try:
            stub.SubmitJob(worker_pb2.GenerateRequest(prompt="bad", width=100))
            raise AssertionError("width 100 was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert "width" in e.details(), e.details()
    print("python client OK")


if __name__ == "__main__":
    main(sys.argv[2])
