"""The seed guide's FastAPI ``/generate`` service, on Trio, with structured background work.

The guide logs each generation with FastAPI's ``BackgroundTasks`` (fire-and-forget). Here
the app's lifespan owns the client, a nursery and a channel: handlers hand log records to
the channel with ``send_nowait``, one worker in the nursery writes them, and shutdown
waits until every record is written. Served by Hypercorn's Trio worker
(``trio_llm.serve.serve``), over trio-llm's in-process fake LLM server (offline)::

    python examples/serve.py            # start, POST /generate once, print the reply, exit
    python examples/serve.py --serve    # keep serving on http://127.0.0.1:8000 (Ctrl-C stops)
"""

from __future__ import annotations

import argparse
import functools
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx2
import trio
from fastapi import FastAPI
from pydantic import BaseModel

import trio_llm
from trio_llm.serve import serve
from trio_llm.testing import open_fake_llm


class GenerateRequest(BaseModel):
    prompt: str
    max_tokens: int = 64


class GenerateResponse(BaseModel):
    generated_text: str


def build_app(upstream_url: str) -> FastAPI:
    """Return the /generate app; its lifespan owns the client and the log worker."""

    async def write_log(receive: trio.MemoryReceiveChannel[str]) -> None:
        async with receive:
            async for line in receive:
                await trio.sleep(0.01)  # stands for a slow sink: a file, a database
                print(f"[log] {line}", flush=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        send, receive = trio.open_memory_channel[str](100)
        async with (
            trio_llm.open_client(base_url=upstream_url, api_key="", model="fake-gpt") as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(write_log, receive)
            async with send:  # closing it at shutdown lets the worker finish the queue
                app.state.client = client
                app.state.log = send
                yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/generate")
    async def generate(request: GenerateRequest) -> GenerateResponse:
        reply = await app.state.client.chat(request.prompt, max_tokens=request.max_tokens)
        app.state.log.send_nowait(f"{len(request.prompt)} chars in, {len(reply.text)} out")
        return GenerateResponse(generated_text=reply.text)

    return app


async def main(argv: Sequence[str] | None = None) -> None:
    """Serve the app; without --serve, call it once and stop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C")
    parser.add_argument("--port", type=int, default=8000, help="port for --serve")
    args = parser.parse_args(argv)
    async with open_fake_llm() as upstream:
        app = build_app(upstream.base_url)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                functools.partial(
                    serve, app, port=args.port if args.serve else 0, shutdown_trigger=stop.wait
                )
            )
            if args.serve:
                print(f'serving on {url}: curl -d \'{{"prompt": "Hi"}}\' {url}/generate')
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
            else:
                async with httpx2.AsyncClient(base_url=url) as http:
                    response = await http.post("/generate", json={"prompt": "Hello, Trio!"})
                print(response.json()["generated_text"], flush=True)
            stop.set()  # graceful: in-flight requests finish, then the log is drained


if __name__ == "__main__":
    trio.run(main)
