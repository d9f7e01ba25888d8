"""A token-streaming "model": a tiny deterministic Markov chain that yields its answer word by word.

The entrypoint is a generator, so the mesh streams each ``Token`` to the caller as it is made
(``Session.stream``, ``AsyncSession.stream``; ``invoke`` returns the list of them).  The same
prompt always gives the same tokens (the chain's choices are seeded by the prompt, not by the
clock or the process), so the entrypoint is ``restartable``: if its instance dies mid-stream the
mesh may run it again from the start, and the caller gets the parts it has not seen yet.
"""
import time
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List

from executor import Instance

CORPUS = """the mesh sends each task to an executor and the executor runs it in an instance .
the instance yields each token as it is made and the mesh streams it to the caller .
a caller reads the tokens as they arrive and a slow caller holds the stream back .
the stream ends when the model stops and the caller sees every token in order ."""
MAX_TOKENS = 12       # words per answer at most
DELAY = 0.05          # seconds "thinking" per token


@dataclass
class Prompt:
    text: str


@dataclass
class Token:
    text: str


def _chain(corpus: str) -> Dict[str, List[str]]:
    """word -> the words that follow it in the corpus (in order, repeats kept: a bigram model)."""
    words = corpus.split()
    nxt: Dict[str, List[str]] = {}
    for a, b in zip(words, words[1:]):
        nxt.setdefault(a, []).append(b)
    return nxt


CHAIN = _chain(CORPUS)


def generate(prompt: str) -> Iterator[str]:
    """The answer's words: start from the prompt's last known word (else "the"), then walk the
    chain, each step picking a follower by a checksum of the prompt and the step (deterministic),
    up to the end of a sentence (after four words at least) or MAX_TOKENS words."""
    known = [w for w in prompt.lower().split() if w in CHAIN]
    word = known[-1] if known else "the"
    seed = zlib.crc32(prompt.encode())
    made = 0
    for step in range(4 * MAX_TOKENS):
        followers = CHAIN.get(word)
        if not followers or made == MAX_TOKENS:
            return
        word = followers[(seed + step * 7919) % len(followers)]
        if word == "." and made >= 4:
            return             # the end of a sentence, once there is something to say
        if word != ".":
            made += 1
            yield word


ins = Instance()


@ins.entrypoint(restartable=True)
def complete(prompt: Prompt) -> Iterator[Token]:
    for word in generate(prompt.text):
        time.sleep(DELAY)
        yield Token(word)


if __name__ == "__main__":
    ins.run()
