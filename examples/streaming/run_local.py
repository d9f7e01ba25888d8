"""Token streaming end to end, with the sync and the asyncio client, on a mesh this script starts.

    python examples/streaming/run_local.py

Starts a manager and two executors on loopback, registers streaming-model (model_service.py: a
tiny deterministic Markov "model" whose entrypoint yields one Token per word), then:
Session.stream prints tokens as they arrive; AsyncSession does the same under asyncio and streams
several prompts at once with asyncio.gather; invoke returns the list of all parts; and leaving a
stream early stops the remote generator.
"""
import asyncio
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from model_service import Prompt  # noqa: E402

from client import AsyncSession, Client, Session  # noqa: E402
from client.local import LocalMesh  # noqa: E402

APP = "streaming-model"


def sync_client() -> None:
    with Session(APP) as s:
        # (a) each token printed the moment it arrives (timeout: seconds to wait for each one)
        print("stream> ", end="", flush=True)
        for token in s.stream(Prompt("the mesh"), timeout=30):
            print(token.text, end=" ", flush=True)
        print()

        # (c) invoke on a streaming entrypoint: the list of all its parts, once the stream ends
        parts = s.invoke(Prompt("the mesh"), timeout=30)
        print(f"invoke -> {len(parts)} parts: {parts[:2]} ... {' '.join(t.text for t in parts)}")

        # (d) breaking out early: leaving the `with` closes the stream, which stops the generator
        with s.stream(Prompt("Tell me about the caller"), timeout=30) as tokens:
            first = []
            for token in tokens:
                first.append(token.text)
                if len(first) == 3:
                    break
        print(f"broke off after 3 tokens: {' '.join(first)} (closing the stream stopped the generator)")
        print(f"the session goes on: {' '.join(t.text for t in s.invoke(Prompt('a stream'), timeout=30))}")


async def async_client() -> None:
    async with AsyncSession(APP) as s:
        # (b) the same stream, under asyncio
        print("async stream> ", end="", flush=True)
        async for token in s.stream(Prompt("the mesh"), timeout=30):
            print(token.text, end=" ", flush=True)
        print()

        # several prompts at once, each stream iterated by its own coroutine
        async def answer(prompt: str) -> str:
            return " ".join([t.text async for t in s.stream(Prompt(prompt), timeout=30)])

        prompts = ["hello", "instance", "why stream tokens"]
        t0 = time.monotonic()
        answers = await asyncio.gather(*(answer(p) for p in prompts))
        print(f"{len(prompts)} prompts streamed concurrently in {time.monotonic() - t0:.1f}s:")
        for p, a in zip(prompts, answers):
            print(f"  {p!r} -> {a}")
        print(f"async invoke -> {len(await s.invoke(Prompt('the mesh'), timeout=30))} parts")


def main() -> None:
    with LocalMesh(executors=2, slots=2) as mesh:
        os.environ["ZMESH_MANAGER"] = mesh.endpoint
        print(f"mesh up at {mesh.endpoint} with 2 executors")
        with Client() as c:
            c.register_application(os.path.join(HERE, "model-app.yaml"))
        sync_client()
        asyncio.run(async_client())
    print("mesh stopped")


if __name__ == "__main__":
    main()
