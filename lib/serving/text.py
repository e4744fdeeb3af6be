"""Between messages and tokens while serving: the sampling knobs users see as SamplingParams, a conversation fitted
into the model's context (oldest turns dropped), and TextStream, which turns generated ids into text that is safe to
show (whole UTF-8 characters, stop strings cut, a possible stop string held back)."""

from __future__ import annotations

from collections.abc import Sequence

from lib.chat import encode_chat
from lib.model.generate import SamplingParams


class ContextTooLong(ValueError):
    """The prompt does not leave room for a single new token in the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int):
        self.prompt_tokens, self.context_length = prompt_tokens, context_length
        super().__init__(f"the prompt is {prompt_tokens} tokens but the model's context length is {context_length} "
                         f"tokens (at least one must be left for the reply); shorten the prompt or the conversation")



def sampling_params(temperature: float, top_p: float, max_new_tokens: int, seed: int | None = None, **extra):
    """lib.model.generate.SamplingParams from the knobs users see. top_p = 0 keeps only the most likely token, i.e. greedy
    (OpenAI's reading of it; lib.model.generate itself wants top_p in (0, 1])."""
    if top_p <= 0:
        temperature, top_p = 0.0, 1.0
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                          seed=seed, **extra)


# ---------------------------------------------------------------------------------------------------------
# Prompts (rendering and encoding are lib.chat's).


def fit_conversation(tokenizer, messages: list[dict], context_length: int, reserve: int) -> tuple[list[int], int]:
    """Encode a chat, dropping its oldest non-system turns until `reserve` new tokens fit; returns (ids, n_dropped).

    For the UI and the terminal chat, where a long conversation should keep going. The API does not trim: it
    answers 400 like OpenAI's, since the client decides what to drop.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = encode_chat(tokenizer, system + turns)
        if len(ids) + reserve <= context_length or len(turns) <= 1:
            break
        turns = turns[1:]
        dropped += 1
        if turns and turns[0]["role"] == "assistant":  # a conversation starts with the user
            turns, dropped = turns[1:], dropped + 1
    if len(ids) >= context_length:
        raise ContextTooLong(len(ids), context_length)
    return ids, dropped


# ---------------------------------------------------------------------------------------------------------
# Token ids → text.


class TextStream:
    """Incremental detokenizer with stop strings.

    `push(id)` returns the text that is now safe to show: tokenizers' DecodeStream waits while the last tokens end
    inside a UTF-8 character (a byte-level BPE splits emoji and CJK across tokens), a stop string ends the stream and
    is not shown, and a tail that could be the beginning of a stop string is held back until it is not.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.backend_tokenizer  # every tokenizer we load is a fast (Rust) one
        self.stop = [s for s in stop if s]
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held = ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        piece = self._stream.step(self.backend, token_id)
        return self._cut(piece) if piece else ""  # None: a multi-byte character is still incomplete

    def finish(self) -> str:
        """The rest of the text at the end of generation: what was held back as a possible stop string."""
        if self.stopped:
            return ""
        out, self._held = self._held, ""
        self.text += out
        return out

    def _cut(self, piece: str) -> str:
        buf = self._held + piece
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            out = buf[:min(hits)]
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
            out, self._held = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out
