"""A chain, without a framework: a prompt template and a model, run over several topics at once.

The seed guide's LangChain chain (a ``PromptTemplate``, an LLM, ``arun`` over topics, a
streaming stdout callback) as plain Trio code:

- ``trio_llm.Prompt`` is the template: named fields, checked when filled.
- A chain is an async function: stream a story, then feed it to a second prompt for its
  title. One call's output is the next one's input, through an ordinary variable.
- Callbacks are a memory channel: every chain sends its chunks to it and the main task
  prints them, so the stories stream to stdout in topic order while all are generated at
  once (a story is printed live while it is the one on screen, the others are buffered).

Runs offline with no arguments, against trio-llm's fake server; or against any
OpenAI-compatible API::

    python examples/chains.py
    OPENAI_API_KEY=sk-... python examples/chains.py --base-url https://api.openai.com/v1
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm

TOPICS = ["a lighthouse keeper", "a lost umbrella", "the last tram home", "a robot gardener"]

STORY = trio_llm.Prompt(
    "Write a short story about {topic}.", system="You are a concise storyteller.", max_tokens=80
)
TITLE = trio_llm.Prompt("Give this story a title of at most five words:\n\n{story}", max_tokens=10)

# What a chain reports on the channel: (topic index, "chunk" or "title", text).
Event = tuple[int, str, str]


async def story_chain(
    client: trio_llm.Client, index: int, topic: str, events: trio.MemorySendChannel[Event]
) -> None:
    """Stream a story about ``topic``, then title it; report both on ``events``."""
    async with events:
        async with client.stream(STORY.messages(topic=topic), **STORY.params) as stream:
            async for chunk in stream:
                await events.send((index, "chunk", chunk.text))
        title = await TITLE.run(client, story=stream.response.text)
        await events.send((index, "title", title.text))


async def main(argv: list[str] | None = None) -> None:
    """Run the chain over every topic concurrently; stream the stories in topic order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    args = parser.parse_args(argv)

    async with AsyncExitStack() as stack:
        base_url, api_key = args.base_url, None  # None: the key comes from $OPENAI_API_KEY
        if base_url is None:
            config = FakeLLMConfig(latency=0.2, tokens_per_second=50)
            server = await stack.enter_async_context(open_fake_llm(config))
            base_url, api_key = server.base_url, "sk-fake"
            print(f"(no --base-url: offline, using a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(base_url=base_url, api_key=api_key, model=args.model)
        )

        start = trio.current_time()
        pending: list[list[str]] = [[] for _ in TOPICS]
        titles: dict[int, str] = {}
        on_screen = 0
        print(f"## {TOPICS[0]}")
        send, receive = trio.open_memory_channel[Event](0)
        async with trio.open_nursery() as nursery, receive:
            async with send:
                for index, topic in enumerate(TOPICS):
                    nursery.start_soon(story_chain, client, index, topic, send.clone())
            async for index, kind, text in receive:
                if kind == "chunk":
                    pending[index].append(text)
                else:
                    titles[index] = text
                # Print what the story on screen has so far; move on when it is titled.
                while on_screen < len(TOPICS):
                    print("".join(pending[on_screen]), end="", flush=True)
                    pending[on_screen].clear()
                    if on_screen not in titles:
                        break
                    print(f"\n   -- title: {titles[on_screen]}\n")
                    on_screen += 1
                    if on_screen < len(TOPICS):
                        print(f"## {TOPICS[on_screen]}")
        elapsed = trio.current_time() - start
        print(f"{len(TOPICS)} stories and titles in {elapsed:.2f} s, generated concurrently")


if __name__ == "__main__":
    trio.run(main)
