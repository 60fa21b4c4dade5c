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

from collections.abc import Callable

from lorax_core.engine.sequence import Sequence

_MAX_PENDING = 8  # tokens after which text still ending in U+FFFD is committed as it is

Decode = Callable[[list[int]], str]


def text_decoder(tokenizer) -> Decode:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, from its Rust tokenizer directly where that is all the call
    does: a fast tokenizer whose decode no subclass changes. The wrapper's Python costs about 3 of a call's 4 us on
    short windows, and the engine decodes two windows per sequence per step.

    The one thing the wrapper may add is `clean_up_tokenization` ("a ." -> "a."), depending on the tokenizer's
    config and the transformers version (transformers 5 skips it for BPE models); a probe shows whether it does."""
    from transformers import PreTrainedTokenizerFast

    slow: Decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    cls, backend = type(tokenizer), getattr(tokenizer, "backend_tokenizer", None)
    if not (isinstance(tokenizer, PreTrainedTokenizerFast) and backend is not None
            and cls.decode is PreTrainedTokenizerFast.decode and cls._decode is PreTrainedTokenizerFast._decode):
        return slow
    fast: Decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return fast
    probe = backend.encode("a . b , c ! d ? e n't f 's", add_special_tokens=False).ids
    raw, decoded = fast(probe), slow(probe)
    cleaned = tokenizer.clean_up_tokenization(raw)
    if raw == cleaned:
        return slow  # the probe cannot tell (its text did not come back with the spaces clean-up removes)
    if decoded == raw:
        return fast
    if decoded == cleaned:
        return lambda ids: tokenizer.clean_up_tokenization(backend.decode(ids, skip_special_tokens=True))
    return slow


def append_text(decode: Decode, seq: Sequence) -> int:
    """Bring `seq.text` up to its tokens (`decode` from text_decoder); returns the length of its text before this
    step's uncommitted part (what is before it does not change)."""
    committed, window = seq.text_committed, seq.token_ids[seq.prompt_len + seq.text_start:]
    known = decode(window[:seq.text_end - seq.text_start])
    text = decode(window)
    seq.text = seq.text[:committed] + text[len(known):]
    pending = seq.num_completion_tokens - seq.text_end
    if len(text) > len(known) and (not text.endswith("\ufffd") or pending >= _MAX_PENDING):
        seq.text_committed = len(seq.text)
        seq.text_start, seq.text_end = seq.text_end, seq.num_completion_tokens
    return committed
