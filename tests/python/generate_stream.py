"""One `Generate` stream, drained: shared by the Python clients in this folder."""


def generate(stub, request, timeout: float):
    """Runs `request` through `stub.Generate`; returns the event kinds in order and the
    `completed` event (None if the job did not complete). A `failed` event raises."""
    kinds, completed = [], None
    for event in stub.Generate(request, timeout=timeout):
        kind = event.WhichOneof("event")
        kinds.append(kind)
        if kind == "completed":
            completed = event.completed
        if kind == "failed":
            raise AssertionError(f"job failed: {event.failed}")
    return kinds, completed
