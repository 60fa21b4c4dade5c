"""The demo's four synthetic tasks, in the spirit of the LoRA Land report's task mix (classification, extraction,
transformation, arithmetic), plus the generic text the small base model is pre-trained on.

Every record is `{"task", "prompt", "completion"}` with space-separated words, so a word-level tokenizer covers
them exactly. Each task draws its train and test sets from disjoint inputs (held-out combinations), with one
seeded generator per task, so a run is reproducible and the test set measures generalisation, not recall.
"""
from __future__ import annotations

import itertools
import random

POSITIVE = ["great", "lovely", "superb", "tasty", "friendly", "clean", "quick", "fresh", "cosy", "perfect"]
NEGATIVE = ["awful", "rude", "dirty", "slow", "stale", "bland", "noisy", "cold", "broken", "terrible"]
SUBJECTS = ["food", "staff", "room", "service", "view", "coffee", "bed", "music", "price", "menu"]
FILLER = ["the", "was", "and", "very", "really", "quite", "but", "a", "bit", "we", "felt", "it", "so"]
NAMES = ["anna", "ben", "carla", "dev", "emma", "farid", "gina", "hugo", "iris", "jon"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito", "dakar", "hanoi", "perth", "riga"]
DAYS = ["monday", "tuesday", "friday", "sunday"]
EN_FR = {"red": "rouge", "blue": "bleu", "green": "vert", "black": "noir", "white": "blanc", "big": "grand",
         "small": "petit", "dog": "chien", "cat": "chat", "house": "maison", "car": "voiture", "tree": "arbre",
         "bird": "oiseau", "book": "livre", "sun": "soleil", "moon": "lune"}
NUMBERS = [str(n) for n in range(19)]
TASKS = ["sentiment", "extraction", "translation", "addition"]
MARKERS = ["review", "sentiment", "message", "destination", "translate", "french", "add", "sum", ":", "=", "from",
           "to", "will", "fly", "on", "leaves", "for", "goes", "heads", "travels", "via", "plus", "is", "in",
           "then"]


def vocabulary() -> list[str]:
    """Every word the tasks and the pre-training text use (the tokenizer's vocabulary, after the specials)."""
    words = (POSITIVE + NEGATIVE + SUBJECTS + FILLER + NAMES + CITIES + DAYS + list(EN_FR) + list(EN_FR.values())
             + NUMBERS + MARKERS + ["positive", "negative"])
    return list(dict.fromkeys(words))


def sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    words = POSITIVE if label == "positive" else NEGATIVE
    clauses = [f"the {rng.choice(SUBJECTS)} was {rng.choice(['', 'very ', 'really ', 'quite '])}{rng.choice(words)}"
               for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.5:  # a neutral clause mentioning the other subject
        clauses.insert(rng.randrange(len(clauses) + 1), f"we felt it was a bit {rng.choice(SUBJECTS)}")
    return f"review : {' and '.join(clauses)} sentiment :", label


def extraction(rng: random.Random) -> tuple[str, str]:
    name, day = rng.choice(NAMES), rng.choice(DAYS)
    origin, destination = rng.sample(CITIES, 2)
    verb = rng.choice(["will fly", "travels", "goes", "heads", "leaves"])
    form = rng.randrange(3)
    if form == 0:
        text = f"{name} {verb} from {origin} to {destination} on {day}"
    elif form == 1:
        text = f"on {day} {name} {verb} to {destination} from {origin}"
    else:
        text = f"{name} {verb} to {destination} via {origin} on {day}"
    return f"message : {text} destination :", destination


def translation(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(list(EN_FR)) for _ in range(rng.randint(2, 3))]
    return f"translate : {' '.join(words)} french :", " ".join(EN_FR[w] for w in words)


def addition(a: int, b: int) -> tuple[str, str]:
    return f"add : {a} {b} sum :", str(a + b)


def make_task(task: str, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and test records of one task; no test prompt appears in the training set."""
    rng = random.Random(f"{task}-{seed}")
    if task == "addition":  # hold out a quarter of the digit pairs
        pairs = list(itertools.product(range(10), repeat=2))
        rng.shuffle(pairs)
        cut = len(pairs) // 4
        test, train = pairs[:cut], pairs[cut:]
        train_records = [addition(*rng.choice(train)) for _ in range(n_train)]
        test_records = [addition(*p) for p in (test * (n_test // len(test) + 1))[:n_test]]
    else:
        make = {"sentiment": sentiment, "extraction": extraction, "translation": translation}[task]
        test_records, seen = [], set()
        while len(test_records) < n_test:
            prompt, completion = make(rng)
            if prompt not in seen:
                seen.add(prompt)
                test_records.append((prompt, completion))
        train_records = []
        while len(train_records) < n_train:
            prompt, completion = make(rng)
            if prompt not in seen:
                train_records.append((prompt, completion))
    as_dicts = lambda records: [{"task": task, "prompt": p, "completion": c} for p, c in records]
    return as_dicts(train_records), as_dicts(test_records)


def pretraining_text(n: int, seed: int) -> list[str]:
    """Generic text over the same words, in none of the tasks' formats: counting, repeated word lists, sums and
    word translations in prose, travel and opinion sentences. It is the base model's "world knowledge" (as a
    real base model knows French words and small sums); an adapter still has to learn each task's format and
    answer convention, which the base alone does not follow (it scores about 0 on every task)."""
    rng = random.Random(f"pretrain-{seed}")
    vocab = vocabulary()

    def counting() -> str:
        start = rng.randrange(12)
        return " ".join(NUMBERS[start:start + rng.randint(3, 8)])

    def repeat() -> str:
        words = " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 6)))
        return f"{words} {words}"

    def fact() -> str:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} plus {b} is {a + b}"

    def french() -> str:
        word = rng.choice(list(EN_FR))
        return f"the french for {word} is {EN_FR[word]}"

    def travel() -> str:
        a, b = rng.sample(CITIES, 2)
        return f"{rng.choice(NAMES)} was in {a} and then in {b} on {rng.choice(DAYS)}"

    def opinion() -> str:
        good = rng.random() < 0.5
        word = rng.choice(POSITIVE if good else NEGATIVE)
        return f"the {rng.choice(SUBJECTS)} was {word} so the review was {'positive' if good else 'negative'}"

    makers = [counting, repeat, fact, french, travel, opinion]
    return [rng.choice(makers)() for _ in range(n)]
