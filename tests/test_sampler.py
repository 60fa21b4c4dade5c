"""The sampler (lorax_core/engine/sampler.py) against the distribution its parameters define, computed here in plain
Python: temperature, then top-k, top-p and min-p on the renormalised probabilities (transformers' order)."""
import math

import pytest
import torch

from lorax_core.engine.sampler import sample
from lorax_core.engine.sampling import SamplingParams
from lorax_core.engine.sequence import Sequence

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LOGITS = [2.0, 1.5, 1.4, 0.3, 0.2, 0.0, -0.5, -1.0, -1.2, -3.0, -30.0, 1.0]


def expected(logits: list[float], p: SamplingParams) -> list[float]:
    """The probability of each token under p."""
    z = [x / p.temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])[: p.top_k or len(z)]
    top = max(z[i] for i in order)
    weights = {i: math.exp(z[i] - top) for i in order}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    kept, mass = [], 0.0
    for i in order:  # the smallest prefix whose mass reaches top_p, then those at least min_p of the largest
        if mass >= p.top_p:
            break
        kept.append(i)
        mass += probs[i]
    kept = [i for i in kept if probs[i] >= p.min_p * probs[order[0]]] or [order[0]]
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(logits))]


def frequencies(rows: list[SamplingParams], n: int, device: str) -> list[list[float]]:
    """Each row's token frequencies over n draws (each draw a batch of these rows, all with LOGITS on `device`)."""
    logits = torch.tensor([LOGITS] * len(rows), device=device)
    counts = torch.zeros(len(rows), len(LOGITS))
    seqs = [Sequence([1], p, None) for p in rows]
    for _ in range(n):
        counts[torch.arange(len(rows)), torch.tensor(sample(logits, seqs))] += 1
    return (counts / n).tolist()


CASES = {
    "temperature": SamplingParams(temperature=0.7),
    "top-k": SamplingParams(temperature=1.3, top_k=4),
    "top-p": SamplingParams(top_p=0.8),
    "min-p": SamplingParams(temperature=0.9, min_p=0.2),
    "all": SamplingParams(temperature=1.1, top_k=6, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("batch", [["temperature"], ["top-k"], ["top-k", "all"], list(CASES)],
                         ids=["no filter", "top-k only", "top-k in every row", "mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_draws_follow_the_filtered_distribution(batch, device):
    """Each path of the sampler (no sort, top-k of every row, a whole sort) against the reference: each token's
    frequency within 5 standard deviations of its probability over 3000 draws, filtered tokens never drawn."""
    torch.manual_seed(0)
    n = 3000
    for name, freq in zip(batch, frequencies([CASES[name] for name in batch], n, device)):
        probs = expected(LOGITS, CASES[name])
        for token, (f, q) in enumerate(zip(freq, probs)):
            assert f == 0 if q == 0 else abs(f - q) <= 5 * math.sqrt(q * (1 - q) / n) + 1e-3, (name, token, f, q)


def test_reference_filters_as_documented():
    """The reference itself, on cases worked by hand."""
    p = expected([3.0, 2.0, 1.0, 0.0], SamplingParams(top_k=2))
    assert p[2] == p[3] == 0 and p[0] == pytest.approx(math.e / (math.e + 1))
    assert expected([3.0, 2.0, 1.0, 0.0], SamplingParams(top_p=0.5)) == [1.0, 0.0, 0.0, 0.0]  # 0.64 >= 0.5
    p = expected([0.0, 0.0, -10.0], SamplingParams(min_p=0.1))
    assert p == [0.5, 0.5, 0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat_whatever_shares_their_batch(device):
    torch.manual_seed(1)
    logits = torch.randn(6, 50).to(device)
    greedy, seeded = SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.95, seed=123)
    others = [SamplingParams(temperature=1.5), SamplingParams(temperature=0.5, top_k=5), greedy, greedy]

    def seeded_tokens(batch: list[SamplingParams], at: int, steps: int = 20) -> list[int]:
        seqs = [Sequence([1], p, None) for p in batch]
        rows = logits[:len(batch)].clone()
        rows[at] = logits[5]
        out = []
        for _ in range(steps):
            tokens = sample(rows, seqs)
            for i, p in enumerate(batch):
                if p.greedy:
                    assert tokens[i] == int(rows[i].argmax())
            out.append(tokens[at])
        return out

    alone = seeded_tokens([seeded], 0)
    assert len(set(alone)) > 1  # it samples
    assert seeded_tokens(others + [seeded], 4) == alone  # with other rows, at another position
    assert seeded_tokens([seeded, *others[:2]], 0) == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=124)
    assert seeded_tokens([other_seed], 0) != alone
    far = SamplingParams(temperature=1.0, top_p=0.95, seed=123 + 2**32)  # the CPU generator keeps 32 bits of a seed
    assert seeded_tokens([far], 0) != alone
    # whichever path the batch takes: top-k of every row (as wide as the largest k), a whole sort, no sort
    for seeded in (SamplingParams(temperature=1.0, top_k=5, seed=9), SamplingParams(temperature=0.8, seed=9)):
        alone = seeded_tokens([seeded], 0)
        assert len(set(alone)) > 1
        for other in (SamplingParams(top_k=40), SamplingParams(top_p=0.9), SamplingParams(), greedy):
            assert seeded_tokens([other, seeded], 1) == alone, (seeded, other)


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_and_logprobs_see_the_logits_they_should(device):
    """The penalty changes the greedy choice but not the caller's logits; logprobs are the model's (before the
    penalty and temperature)."""
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]], device=device)
    seq = Sequence([0], SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=2), None)
    assert sample(logits, [seq]) == [1]  # token 0 was in the prompt: 3.0 / 2 < 2.9
    assert logits[0, 0] == 3.0
    lp = torch.log_softmax(logits[0], dim=0).cpu()
    assert seq.logprobs[0].token_id == 1 and seq.logprobs[0].logprob == pytest.approx(float(lp[1]))
    assert seq.logprobs[0].top == pytest.approx({0: float(lp[0]), 1: float(lp[1])})


def penalized_reference(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    """OpenAI's logit bias, transformers' repetition penalty over the prompt and output, then OpenAI's presence and
    frequency penalties over the output."""
    out = list(logits)
    for t, b in (p.logit_bias or {}).items():
        out[t] += b
    for t in set(prompt + output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_equal_the_reference_row_by_row(device):
    """Greedy rows with each penalty, all of them, none, over 12 steps of output (with repeats): each picks the
    argmax of the reference's penalized logits."""
    import random

    rng = random.Random(0)
    cases = [SamplingParams(temperature=0, repetition_penalty=1.3), SamplingParams(temperature=0, presence_penalty=1.2),
             SamplingParams(temperature=0, frequency_penalty=0.7),
             SamplingParams(temperature=0, frequency_penalty=-0.5),
             SamplingParams(temperature=0, repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=2.0),
             SamplingParams(temperature=0, logit_bias={3: 2.5, 7: -1.0, 11: 0.8}),
             SamplingParams(temperature=0, logit_bias={5: 1.5}, repetition_penalty=1.5, frequency_penalty=0.5),
             SamplingParams(temperature=0)]
    vocab = 40
    seqs = [Sequence([rng.randrange(vocab) for _ in range(5)], p, None) for p in cases]
    for step in range(12):
        logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(step))
        tokens = sample(logits.to(device), seqs)
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            ref = penalized_reference(logits[i].tolist(), seq.token_ids[:seq.prompt_len], seq.completion_ids,
                                      seq.params)
            assert token == max(range(vocab), key=ref.__getitem__), (i, step)
            seq.append(rng.choice([token, token, rng.randrange(vocab)]))  # repeats, so counts grow past 1
    assert max(seqs[2].output_counts.values()) > 1


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_rows_draw_from_the_penalized_distribution(device):
    """3000 rows, each with the same prompt and output so far and every penalty: token frequencies within 5
    standard deviations of softmax(reference penalized logits)."""
    torch.manual_seed(2)
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.8,
                            logit_bias={2: 1.0, 5: 1.0, 9: 2.0, 10: -100})  # 2 is in the prompt: biased, then penalized
    prompt, output, n = [2, 11, 7], [0, 0, 1, 3, 0, 6], 3000  # seen tokens with positive and negative logits
    seqs = []
    for _ in range(n):
        seqs.append(Sequence(prompt, params, None))
        for t in output:
            seqs[-1].append(t)
    tokens = torch.tensor(sample(torch.tensor([LOGITS] * n, device=device), seqs))
    freq = (torch.bincount(tokens, minlength=len(LOGITS)) / n).tolist()
    ref = penalized_reference(LOGITS, prompt, output, params)
    probs = expected(ref, params)
    assert ref[0] == pytest.approx(LOGITS[0] / 2 - 0.5 - 3 * 0.8) and ref[7] == LOGITS[7] * 2 and ref[9] == -1.0
    for token, (f, q) in enumerate(zip(freq, probs)):
        assert abs(f - q) <= 5 * math.sqrt(q * (1 - q) / n) + 1e-3, (token, f, q)


def test_extreme_values_do_not_break_the_batch():
    """A temperature too small to divide by is greedy; top-k past int64 is off; logprobs past the vocabulary give
    the whole vocabulary; seeds of 64 bits work, larger ones are refused."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]] * 4)
    seqs = [Sequence([1], p, None) for p in (SamplingParams(temperature=1e-40), SamplingParams(top_k=2**70),
                                             SamplingParams(top_k=2, logprobs=20), SamplingParams(seed=2**64 - 1))]
    tokens = sample(logits, seqs)
    assert tokens[0] == 1 and tokens[2] in (1, 3) and len(seqs[2].logprobs[0].top) == 4
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-4).greedy
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(ValueError, match="seed must be None or an integer in"):
            SamplingParams(seed=seed)


def test_penalty_and_bias_values_are_checked():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-2.1)):
        with pytest.raises(ValueError, match="must be in \\[-2, 2\\]"):
            SamplingParams(**bad)
    for bad in ({5: 101.0}, {-1: 1.0}, {"5": 1.0}, [5]):
        with pytest.raises(ValueError, match="logit_bias must map token ids >= 0 to biases in \\[-100, 100\\]"):
            SamplingParams(logit_bias=bad)
