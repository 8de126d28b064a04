"""Each deployment (workloads/deploy.py) serves concurrent requests end to end — worker processes through the
shim, the daemon where the deployment has one — and the tiny model's tokens are the numpy reference's: a
co-located decode worker reads the prefill worker's KV cache through IPC memory, a disaggregated one pulls it
across chips. Killing the decode worker ends its requests with a clear error and leaves the rest serving."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import trio
from reference_model import reference_greedy

from tests.conftest import requires_mount
from tools.launch import deployment
from workloads.model import model_config
from workloads.serving import EngineError
from workloads.spec import ServeSpec
from workloads.weights import random_checkpoint

TINY = model_config("tiny")
PROMPTS = [list(b"hello, world"), list(b"abc"), list(b"the quick brown fox")]
MAX_TOKENS = 5
SPEC = ServeSpec(model="tiny", num_blocks=64, block_size=4, max_num_seqs=4, max_model_len=64, time_scale=0.0)


@pytest.fixture(scope="module")
def expected():
    return reference_greedy(TINY, random_checkpoint(TINY, seed=0), PROMPTS, MAX_TOKENS - 1)


async def complete(engine, request_id: str, prompt: list[int]) -> tuple[list[int], str | None]:
    tokens, finish = [], None
    async for out in engine.generate(request_id, prompt, MAX_TOKENS, ignore_eos=True):
        tokens.append(out.token)
        finish = out.finish
    return tokens, finish


async def serve_all(kind: str, tmp_path, spec: ServeSpec = SPEC) -> list:
    results: dict[int, tuple] = {}
    async with deployment(kind, spec, tmp_path) as engine:

        async def one(i: int) -> None:
            results[i] = await complete(engine, f"r{i}", PROMPTS[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(PROMPTS)):
                nursery.start_soon(one, i)
        assert engine.stats().kv_blocks_used == 0  # every block given back
    return [results[i] for i in range(len(PROMPTS))]


def test_direct_serves_the_reference_tokens(tmp_path, expected):
    results = trio.run(serve_all, "direct", tmp_path)
    assert [tokens for tokens, _ in results] == expected
    assert {finish for _, finish in results} == {"length"}


@requires_mount
@pytest.mark.parametrize("kind", ["colocated", "disaggregated"])
def test_split_deployments_serve_the_reference_tokens(kind, tmp_path, expected):
    results = trio.run(serve_all, kind, tmp_path)
    assert [tokens for tokens, _ in results] == expected


@pytest.mark.parametrize("kind", ["direct", pytest.param("colocated", marks=requires_mount)])
def test_chunked_prefill_serves_the_reference_tokens(kind, tmp_path, expected):
    """Prompts of 12, 3 and 19 tokens with 8 prompt tokens a step: the longer ones are prefilled in chunks, each
    later chunk attending to what the earlier ones cached, through the coordinator, the worker and the executor."""
    spec = dataclasses.replace(SPEC, max_num_batched_tokens=8)
    results = trio.run(serve_all, kind, tmp_path, spec)
    assert [tokens for tokens, _ in results] == expected


@requires_mount
def test_killing_the_decode_worker_ends_its_requests_and_the_prefill_goes_on(tmp_path):
    async def main():
        async with deployment("colocated", SPEC, tmp_path) as engine:
            first = await complete(engine, "before", PROMPTS[0])
            assert first[1] == "length"
            decode = next(w for w in engine.workers.values() if w.core.name == "decode")
            os.kill(decode.process.pid, signal.SIGKILL)
            with pytest.raises(EngineError, match="decode engine .* killed by signal 9"):
                await complete(engine, "during", PROMPTS[1])
            # A one-token request never needs the decode worker: the prefill worker still serves it.
            tokens = [out.token async for out in engine.generate("after", PROMPTS[2], 1, ignore_eos=True)]
            assert len(tokens) == 1
            assert engine.stats().kv_blocks_used == 0

    trio.run(main)


def start_serve(*args: str) -> tuple[subprocess.Popen, str]:
    """`vdevctl serve ARGS` on a free port, once it answers; (the process, its /v1 URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen(
        [sys.executable, "-m", "tools.vdevctl", "serve", *args, "--port", str(port)], stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/models")
            return serve, url
        except httpx.TransportError:
            if serve.poll() is not None or time.monotonic() > deadline:
                serve.kill()
                raise AssertionError(f"vdevctl serve did not come up: {serve.communicate()[1]}") from None
            time.sleep(0.1)


def test_vdevctl_serve_answers_over_http_and_stops_cleanly_on_sigint():
    """The front end over a deployment, as a user starts it: one command, then SIGINT stops everything."""
    serve, url = start_serve("--deployment", "direct")
    try:
        models = httpx.get(f"{url}/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        answer = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4}).json()
        assert answer["usage"]["completion_tokens"] == 4
        bad = httpx.post(f"{url}/completions", json={"model": "llama", "prompt": "hello"})
        assert bad.status_code == 404 and "llama" in bad.json()["error"]["message"]
    finally:
        serve.send_signal(signal.SIGINT)
        _, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err


@requires_mount
@pytest.mark.parametrize("victim", ["engine", "daemon"])
def test_vdevctl_serve_exits_non_zero_when_an_engine_or_the_daemon_dies_even_while_idle(victim):
    """An operator's supervisor restarts what exits: a killed engine worker or daemon, with no request in flight,
    takes `vdevctl serve` down at once with exit code 1 and the reason, instead of answering 503 forever."""
    serve, url = start_serve("--deployment", "colocated")
    try:
        children = subprocess.run(["pgrep", "-P", str(serve.pid), "-a"], capture_output=True, text=True).stdout
        wanted = "workloads.worker" if victim == "engine" else "vdevfs.cli"
        pid = next(int(line.split()[0]) for line in children.splitlines() if wanted in line)
        os.kill(pid, signal.SIGKILL)
        _, err = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.communicate()
    assert serve.returncode == 1, err
    assert "the engine went down" in err and ("killed by signal 9" in err or "daemon" in err), err
