"""What a request asks of an engine and what comes back; shared by the engines, the batcher and the
HTTP layer, so none of them imports another for its types."""

from __future__ import annotations

from dataclasses import dataclass, field

# A prompt as text, or as the token ids the model reads (OpenAI's completions API takes both). Ids are
# read as given: lm-eval scores a window of a long document by its ids, which decoded to text and
# tokenized again need not come back the same where the window's edge cuts a word.
Prompt = str | list[int]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from a token already generated
    frequency_penalty: float = 0.0  # and this times the number of times it was
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its k likeliest alternatives
    echo: bool = False  # the prompt's tokens come back too, with their logprobs when logprobs is set
    adapter: str | None = None  # the LoRA adapter that answers (not a sampling setting: a batch may mix them)

    def group(self) -> tuple:
        """Requests that can share one model.generate call have the same group."""
        return (
            self.temperature,
            self.top_p,
            self.seed,
            self.presence_penalty,
            self.frequency_penalty,
            self.logprobs is not None,
            self.echo,
        )


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None for a prompt's first token, which nothing before it predicts
    top: list[tuple[str, float]]  # the likeliest tokens at this position, with theirs


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # with echo and logprobs: the prompt's own tokens


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop string in it, and whether one was found."""
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopCutter:
    """Stop strings over a stream of text pieces. A stop string may arrive split across pieces, so a
    tail that could be the start of one is held back until the next piece settles it."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # everything received, cut at the first stop string once one has arrived
        self.sent = 0  # how much of `text` has been handed out
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece; return the text that can be sent now."""
        self.text, self.stopped = truncate_at_stop(self.text + piece, self.stop)
        ready = len(self.text) if self.stopped else len(self.text) - self._may_start_stop()
        out = self.text[self.sent : ready]
        self.sent = max(self.sent, ready)
        return out

    def flush(self) -> str:
        """At the end of the stream: the held-back tail, which started no stop string after all."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def _may_start_stop(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
