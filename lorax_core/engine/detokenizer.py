"""A sequence's completion text, grown token by token.

Decoding the whole completion again at each step costs time that grows with its length (with the tests' small
tokenizer, 470 us per step at 2000 tokens on a CI machine's CPU), and the engine waits for it before the next
step. Here each step decodes a short window instead, as vLLM does: the tokens since the text was last committed,
after the ones committed then, whose text gives the new tokens their context (a leading space, a merged byte).
Text that ends in an incomplete character (U+FFFD) is shown as it decodes now and committed once the tokens that
complete it have come (or after 8 more tokens: no UTF-8 character is longer than 4 bytes, so those bytes are
invalid).
"""
from __future__ import annotations

from lorax_core.engine.sequence import Sequence

_MAX_PENDING = 8  # tokens after which text still ending in U+FFFD is committed as it is


def append_text(tokenizer, seq: Sequence) -> int:
    """Bring `seq.text` up to its tokens; returns the length of its text before this step's uncommitted part (what
    is before it does not change)."""
    committed, window = seq.text_committed, seq.token_ids[seq.prompt_len + seq.text_start:]
    known = tokenizer.decode(window[:seq.text_end - seq.text_start], skip_special_tokens=True)
    text = tokenizer.decode(window, skip_special_tokens=True)
    seq.text = seq.text[:committed] + text[len(known):]
    pending = seq.num_completion_tokens - seq.text_end
    if len(text) > len(known) and (not text.endswith("\ufffd") or pending >= _MAX_PENDING):
        seq.text_committed = len(seq.text)
        seq.text_start, seq.text_end = seq.text_end, seq.num_completion_tokens
    return committed
