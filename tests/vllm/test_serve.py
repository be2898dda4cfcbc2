"""`vllm serve` on a Manager checkpoint: one OpenAI chat-completions request with a base64 image, answered like
transformers' `generate` (and so like offline vLLM, test_offline.py). The test starts and stops the server."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from checkpoints import make_image, prompt, write_checkpoint
from reference import Request, transformers_answers

import llava_manager

MAX_TOKENS = 8
STARTUP_SECONDS = 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"vllm serve did not become healthy in {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def server(tmp_path):
    folder = write_checkpoint(tmp_path / "model")
    port = _free_port()
    log = tmp_path / "serve.log"
    command = [
        str(Path(sys.executable).with_name("vllm")), "serve", str(folder),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--gpu-memory-utilization", "0.1",
        "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
    ]  # fmt: skip
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_healthy(url, process, log)
        yield folder, url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_an_openai_chat_request_with_an_image(server):
    from openai import OpenAI

    folder, url = server
    image = make_image(80, 48)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=str(folder),
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": "what is the shape"},
                ],
            }
        ],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    model, processor = llava_manager.from_pretrained(folder)
    expected = transformers_answers(model, processor, [Request(prompt(processor, "what is the shape"), [image])], 8)
    assert reply.choices[0].message.content == processor.decode(expected[0].tokens, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == expected[0].prompt_length
