"""The official `openai` Python client against `serve --http-listen` (tests/tests/openai_client.rs).

Usage: openai_client.py BASE_URL TOKEN
Checks models.list, images.generate (n=2, a size, extra_body seed/steps: same seed, same
images; output_format=jpeg), BadRequestError naming `param` for a bad size and an n over the
limit, NotFoundError for an unknown model, AuthenticationError for a wrong token, and
RateLimitError for some of 8 concurrent requests to a queue of 2 while every accepted one
completes. Prints "openai client OK" at the end.
"""

import base64
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
from openai import OpenAI

base_url, token = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=120)

models = client.models.list()
assert [m.id for m in models.data] == ["tiny"], models

body = dict(model="tiny", prompt="a red square", n=2, size="64x48", extra_body={"seed": 7, "steps": 2})
first = client.images.generate(**body)
assert len(first.data) == 2, first
again = client.images.generate(**body)
assert [d.b64_json for d in again.data] == [d.b64_json for d in first.data], "same seed, same images"
png = base64.b64decode(first.data[0].b64_json)
assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:8]

jpeg = client.images.generate(model="tiny", prompt="p", size="64x64", output_format="jpeg", extra_body={"steps": 1})
assert base64.b64decode(jpeg.data[0].b64_json)[:2] == b"\xff\xd8"

for kwargs, param in [
    (dict(prompt="p", size="big"), "size"),
    (dict(prompt="p", n=5, size="64x64"), "n"),
]:
    try:
        client.images.generate(model="tiny", **kwargs)
        raise AssertionError(f"{kwargs} was accepted")
    except openai.BadRequestError as e:
        assert e.body and e.body.get("param") == param, (kwargs, e.body)

try:
    client.images.generate(model="nope", prompt="p")
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body.get("param") == "model", e.body

try:
    OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong token was accepted")
except openai.AuthenticationError:
    pass

# images.edit: OpenAI's mask (transparent = repaint) inpaints the image, at the image's size.
import io
import struct
import zlib


def png_bytes(width, height, rows, color_type):
    """A minimal PNG (8-bit RGB = 2 or RGBA = 6) from raw rows, without Pillow."""
    raw = b"".join(b"\x00" + row for row in rows)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


image = png_bytes(64, 64, [bytes(v for x in range(64) for v in (x * 4, y * 4, 128)) for y in range(64)], 2)
mask = png_bytes(64, 64, [bytes(v for x in range(64) for v in (0, 0, 0, 0 if x < 32 else 255)) for y in range(64)], 6)
edited = client.images.edit(
    model="tiny", prompt="a cat", image=("image.png", io.BytesIO(image), "image/png"),
    mask=("mask.png", io.BytesIO(mask), "image/png"), extra_body={"seed": 9, "steps": 2},
)
out = base64.b64decode(edited.data[0].b64_json)
assert out[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", out[16:24]) == (64, 64), out[:24]


def attempt(i):
    try:
        r = client.images.generate(model="tiny", prompt=f"load {i}", size="64x64", extra_body={"steps": 60, "seed": i})
        return "ok" if len(r.data) == 1 else "bad"
    except openai.RateLimitError as e:
        assert e.response.headers.get("retry-after"), e.response.headers
        return "refused"


with ThreadPoolExecutor(8) as pool:
    outcomes = list(pool.map(attempt, range(8)))
assert "refused" in outcomes and "ok" in outcomes and "bad" not in outcomes, outcomes

print("openai client OK")
