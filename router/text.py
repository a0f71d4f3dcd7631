"""Tokenization, chat rendering and incremental detokenization, for the router.

The router is the only service that sees text: workers get token ids. :class:`TextCodec`
wraps the model's Hugging Face tokenizer; :class:`IncrementalText` turns a growing list of
output token ids into text deltas whose concatenation is exactly the decoded full output
(a delta is held back while it ends in an incomplete UTF-8 sequence), and applies stop
strings (the stop string itself is not emitted).
"""
from __future__ import annotations

CHAT_ROLES = ("system", "user", "assistant", "tool")


class TextCodec:
    """Owns the tokenizer. Built once per router process from the model source."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._max_token_chars: int | None = None
        self._token_texts: dict[int, str] = {}  # bounded by the vocabulary

    @property
    def max_token_chars(self) -> int:
        """An upper bound on the characters of text one token stands for: the longest vocabulary
        entry as the tokenizer spells it (byte-level BPE spells each byte as one character,
        SentencePiece spells byte-fallback tokens as ``<0xNN>``, so neither undercounts)."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab()
            self._max_token_chars = max((len(t) for t in vocab), default=1)
        return self._max_token_chars

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def render_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        """Token ids of the chat rendered with the model's template, ready for the assistant."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; send a prompt or token ids instead")
        convo = [{"role": role, "content": content} for role, content in messages]
        text = self.tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens spelled out (logprobs name tokens this way); a token
        holding part of a multi-byte character reads as U+FFFD, as in vLLM. Cached per id."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._token_texts[token_id] = text
        return text


class IncrementalText:
    """Text deltas for one request's output stream. Not thread-safe (one per request)."""

    def __init__(self, codec: TextCodec, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._codec = codec
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = ""        # text already sent to the client
        self.stopped = False     # a stop string was found; no more text
        # incremental decoding (as in vLLM's detokenizer): text of ids[:_read] is _stable; only
        # ids[_prefix:] are decoded per call, and _prefix_text (ids[_prefix:_read]) is cut off the
        # front, so a decoder that treats a window's first token specially (a leading space)
        # still gives the full decode's text. Each call costs O(new tokens), not O(all tokens).
        self._stable, self._prefix, self._read, self._prefix_text = "", 0, 0, ""

    def _text(self) -> str:
        """The decoded text of all ids so far (equal to decoding them at once)."""
        window = self._codec.decode(self.ids[self._prefix:])
        if not window.startswith(self._prefix_text):    # not prefix-stable here: decode it all
            full = self._codec.decode(self.ids)
            window, self._prefix, self._prefix_text, self._stable = full, 0, "", ""
        full = self._stable + window[len(self._prefix_text):]
        if full and not full.endswith("\ufffd"):       # a complete character: advance the window
            self._stable = full
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._codec.decode(self.ids[self._prefix:self._read])
        return full

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the text to send now ("" when held back or after a stop)."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        full = self._text()
        if self._stop:
            cut = min((i for i in (full.find(s, max(0, len(self.emitted) - len(s) + 1))
                                   for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                return self._delta(full[:cut])
        if not final:
            if full.endswith("\ufffd"):
                return ""  # an incomplete multi-byte character: wait for its remaining bytes
            if self._hold:
                full = full[: max(len(self.emitted), len(full) - self._hold)]
        return self._delta(full)

    def _delta(self, text: str) -> str:
        if not text.startswith(self.emitted):
            return ""  # decoding not prefix-stable at this point: never resend or retract text
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
