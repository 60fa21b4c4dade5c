"""Completion text grown token by token (lorax_core/engine/detokenizer.py): equal to decoding all the tokens at every
whole character, for a byte-level BPE tokenizer (GPT-2 style, the tests' own) and a Llama-style one (metaspace,
byte fallback, leading space stripped), while each step decodes a window of a few tokens."""
from hypothesis import given, settings, strategies as st

from model_helpers import make_tokenizer
from lorax_core.engine.detokenizer import append_text, text_decoder
from lorax_core.engine.sampling import SamplingParams
from lorax_core.engine.sequence import Sequence

TEXT = st.text(st.sampled_from("the cat sé€中😀\n x"), max_size=40)


def llama_style_tokenizer():
    """Like Llama's and Mistral's tokenizer.json: BPE over "▁"-joined pieces, 256 byte tokens for what the pieces
    do not cover, and a decoder that drops the first leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "t", "h", "e", "c", "a", "s", "x", "é", "▁t", "▁th", "▁the", "▁c", "▁ca", "▁cat", "▁s", "▁é"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "c"), ("▁c", "a"), ("▁ca", "t"), ("▁", "s"), ("▁", "é")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte-level": make_tokenizer(), "llama-style": llama_style_tokenizer()}


class Windows:
    """A decode whose calls are recorded (their lengths)."""

    def __init__(self, tokenizer):
        self.decode, self.lengths = text_decoder(tokenizer), []

    def __call__(self, ids):
        self.lengths.append(len(ids))
        return self.decode(ids)


def grow(tokenizer, ids, decode=None):
    """Feed ids one at a time (to append_text with `decode`, text_decoder(tokenizer) if not given); yields (text
    grown so far, the tokenizer's decode of all of them so far)."""
    decode = decode or text_decoder(tokenizer)
    seq = Sequence([1, 7, 9], SamplingParams(), None)  # the prompt is not part of the text
    for i, token in enumerate(ids):
        seq.append(token)
        append_text(decode, seq)
        yield seq.text, tokenizer.decode(ids[:i + 1], skip_special_tokens=True)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(TOKENIZERS)), words=st.lists(TEXT, min_size=1, max_size=4),
       special=st.sampled_from([None, 1, 2]), rust=st.booleans())
def test_equals_decoding_every_token_at_each_whole_character(name, words, special, rust):
    """With the Rust tokenizer's decode (text_decoder's fast path) and with the transformers tokenizer's."""
    tok = TOKENIZERS[name]
    ids = []
    for w in words:  # pieces tokenized apart, with special tokens between (skipped in the text)
        ids += tok(w, add_special_tokens=False)["input_ids"] + ([special] if special else [])
    steps = list(grow(tok, ids, None if rust else lambda window: tok.decode(window, skip_special_tokens=True)))
    for grown, full in steps:
        if not full.endswith("\ufffd"):  # a character still incomplete may decode either way until its last byte
            assert grown == full
    assert not steps or steps[-1][0] == steps[-1][1]


def test_each_step_decodes_a_few_tokens():
    tok = TOKENIZERS["llama-style"]
    text = "the cat sé€中😀 x\n" * 40
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = Windows(tok)
    last = None
    for last, _ in grow(tok, ids, windows):
        pass
    assert len(ids) > 400 and last == tok.decode(ids, skip_special_tokens=True)
    assert max(windows.lengths) <= 8  # 😀 is 4 byte tokens: its window holds them and the token before


def test_invalid_bytes_are_committed_after_a_while():
    """Bytes that never complete a character do not keep the window growing."""
    tok = TOKENIZERS["llama-style"]
    ids = [3 + 0xE2] * 100  # 100 lead bytes of three-byte characters, none completed
    windows = Windows(tok)
    *_, (grown, full) = grow(tok, ids, windows)
    assert grown == full == "\ufffd" * 100 and max(windows.lengths) <= 2 * 8 + 1


def test_text_decoder_calls_the_rust_tokenizer_only_where_that_is_all_decode_does():
    from transformers import PreTrainedTokenizerFast

    def refuse(*args, **kwargs):
        raise AssertionError("the transformers decode was called")

    tok = make_tokenizer()
    ids = tok("the cat sat . isn't it", add_special_tokens=False)["input_ids"] + [2]
    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected == "the cat sat . isn't it"
    decode = text_decoder(tok)
    tok.decode = refuse  # the class's decode is still transformers': the fast path does not call it
    assert decode(ids) == expected
    del tok.decode

    # clean_up_tokenization_spaces: what decode does with it (transformers 5 ignores it for BPE models unless told
    # otherwise) is found by a probe; the decoder gives what decode gives, with or without the clean-up
    tok.clean_up_tokenization_spaces = True
    for force in (False, True):
        tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = force
        expected = tok.decode(ids, skip_special_tokens=True)
        decode = text_decoder(tok)
        tok.decode = refuse
        assert decode(ids) == expected
        del tok.decode
    assert expected == "the cat sat. isn't it"  # the clean-up was forced: " ." -> "."

    class Custom(PreTrainedTokenizerFast):  # a subclass's own decode must be called
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return "custom"

    custom = Custom(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    assert custom.clean_up_tokenization_spaces is False and text_decoder(custom)(ids) == "custom"


def test_streamed_text_holds_back_a_possible_stop_string_and_a_partial_character():
    from lorax_core.engine.llm import LLM

    seq = Sequence([1], SamplingParams(stop=["END!"]), None)
    for text, shown in [("ab", 0), ("abcdefg", 4), ("abcd\ufffd\ufffdxyz", 4), ("", 0)]:
        seq.text = text
        assert LLM._visible_len(seq) == shown, text
    seq = Sequence([1], SamplingParams(), None)
    seq.text = "abc\ufffd\ufffd"
    assert LLM._visible_len(seq) == 3
    seq.finish("length")
    assert LLM._visible_len(seq) == 5  # a finished sequence's text is all sent
