"""Seeded generator of the bundled demo task: binary sentiment of English product and movie reviews.

The demo data ships as ``lightning_peft/tasks/data/demo_train.csv`` (2000 rows) and ``demo_val.csv``
(500 rows), columns ``text,label`` with labels ``negative`` / ``positive`` (balanced). Nothing is downloaded:
the files are written by this module and can be rebuilt byte-for-byte with::

    python -m lightning_peft.tasks.demo_data            # rewrite the bundled files
    python -m lightning_peft.tasks.demo_data --check    # exit 1 if they differ from a fresh generation

How a review is made. A *clause* states an opinion about a subject ("the battery", "the plot") and has a
polarity: an adjective under a copula with an optional intensifier ("the plot was really dull"), a verb of
liking ("I enjoyed the soundtrack") or an outcome phrase ("the charger let me down"). A clause may be
*negated* ("was not very good", "I did not hate the sequel", "never let me down"), which flips its polarity.
A review is one clause, or two clauses of opposite polarity joined by a contrast whose *main* clause decides
the label: "A, but B" / "Although A, B" / "A; however, B" follow B, "B, even though A" follows B although B
comes first. "A and B" joins two clauses of the same polarity. Neutral openers ("Honestly,", "After a
week,") vary the surface.

Why it is a fair task and not keyword spotting. Every subject, intensifier, opener and negator is drawn
independently of the label; about half of the reviews contain both a positive and a negative word (contrast)
and negations occur equally in both classes ("not good" is negative, "not bad" is positive), so counting
sentiment words is wrong on a large share of the data. The model has to resolve scope: which clause the
connective makes the main one and what a negator applies to. There is no label noise: every label follows
from these rules.

Generalisation. The validation split only contains reviews with at least one element never seen in
training: held-out subjects ("the printer", "the cinematography"), held-out adjectives and phrases
("dreadful", "blew me away"), held-out intensifiers and held-out connectives ("A, yet B", "While A, B",
"B, despite the fact that A"). Reviews that also occur in the training file are removed from validation.

Difficulty, measured on the shipped validation split (2 CPU cores, scikit-learn logistic regression):

- counting positive minus negative words of the generator's own lexicon: 65% (tested to stay below 75%);
- bag-of-words logistic regression: 57% (unigrams), 61% (uni+bigrams);
- probe on frozen, mean-pooled all-MiniLM-L6-v2 embeddings (max length 64): 72% (C=1; 66-72% for C in
  0.1-100, 80-93% on the training split);
- full fine-tuning of the same MiniLM with a linear head (`TextClassifier`, AdamW 5e-5, batch 32, 2
  epochs): 91% accuracy, 0.91 macro F1.

So the frozen encoder alone leaves about 20 points that adapting the encoder (LoRA, adapters, full
fine-tuning) can win; an adapter method that does not beat ~72% has learnt nothing beyond the head.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "demo_train.csv"
VAL_FILE = DATA_DIR / "demo_val.csv"
LABELS = ("negative", "positive")

N_TRAIN = 2000
N_VAL = 500
SEED = 20240607
NEGATION_RATE = 0.3  # share of clauses that carry a negator
SINGLE_RATE = 0.5  # share of one-clause reviews
CONTRAST_RATE = 0.4  # share of contrast reviews; the rest are "A and B"

# Pools: ``(train, held_out)``. The training split draws from ``train`` only; validation from both, and each
# validation review must use at least one held-out item.
# Subjects: (noun phrase, plural).
SUBJECTS: tuple[list[tuple[str, bool]], list[tuple[str, bool]]] = (
    [
        ("the battery", False),
        ("the screen", False),
        ("this blender", False),
        ("the headphones", True),
        ("the keyboard", False),
        ("this laptop", False),
        ("the camera", False),
        ("the vacuum cleaner", False),
        ("the charger", False),
        ("the mattress", False),
        ("the coffee maker", False),
        ("these boots", True),
        ("the plot", False),
        ("this film", False),
        ("the acting", False),
        ("the soundtrack", False),
        ("the ending", False),
        ("the dialogue", False),
        ("the sequel", False),
        ("the special effects", True),
        ("the lead actor", False),
        ("this series", False),
    ],
    [
        ("the printer", False),
        ("this backpack", False),
        ("the speakers", True),
        ("the monitor", False),
        ("the cinematography", False),
        ("this documentary", False),
        ("the script", False),
        ("the costumes", True),
    ],
)
POSITIVE_ADJ = (
    [
        "good",
        "great",
        "excellent",
        "wonderful",
        "impressive",
        "reliable",
        "enjoyable",
        "solid",
        "delightful",
        "sturdy",
        "brilliant",
        "pleasant",
        "superb",
        "fantastic",
        "comfortable",
        "charming",
    ],
    ["outstanding", "terrific", "lovely", "marvelous", "dependable"],
)
NEGATIVE_ADJ = (
    [
        "bad",
        "awful",
        "terrible",
        "disappointing",
        "flimsy",
        "boring",
        "poor",
        "mediocre",
        "frustrating",
        "dull",
        "useless",
        "clumsy",
        "annoying",
        "horrible",
        "weak",
        "forgettable",
    ],
    ["dreadful", "lousy", "tedious", "shoddy", "unbearable"],
)
INTENSIFIERS = (
    ["", "", "", "very ", "really ", "quite ", "extremely ", "incredibly ", "truly ", "pretty "],
    ["remarkably ", "genuinely ", "so "],
)
# Under a negator only degree words that read naturally ("not very good", never "not pretty good").
NEGATED_INTENSIFIERS = (["", "", "very ", "really ", "particularly "], ["especially ", "all that "])
# Verbs of liking: (past, base form, polarity).
VERBS = (
    [
        ("loved", "love", 1),
        ("enjoyed", "enjoy", 1),
        ("liked", "like", 1),
        ("appreciated", "appreciate", 1),
        ("hated", "hate", 0),
        ("disliked", "dislike", 0),
        ("despised", "despise", 0),
        ("resented", "resent", 0),
    ],
    [("adored", "adore", 1), ("loathed", "loathe", 0)],
)
# Outcome phrases: (past, base form, polarity).
OUTCOMES = (
    [
        ("exceeded my expectations", "exceed my expectations", 1),
        ("lived up to the hype", "live up to the hype", 1),
        ("impressed me", "impress me", 1),
        ("won me over", "win me over", 1),
        ("let me down", "let me down", 0),
        ("fell short", "fall short", 0),
        ("bored me", "bore me", 0),
        ("annoyed me", "annoy me", 0),
    ],
    [("blew me away", "blow me away", 1), ("got on my nerves", "get on my nerves", 0)],
)
OPENERS = (
    [
        "",
        "",
        "",
        "",
        "Honestly, ",
        "To be fair, ",
        "After a week, ",
        "Overall, ",
        "In my opinion, ",
        "Frankly, ",
    ],
    ["All things considered, ", "To be honest, "],
)
# Two-clause connectives: (template with {a} the subordinate and {b} the main clause). The label is the
# polarity of {b}; {a} has the opposite polarity.
CONTRASTS = (
    [
        "{a}, but {b}",
        "although {a}, {b}",
        "{a}; however, {b}",
        "{b}, even though {a}",
        "{a}, but in the end {b}",
    ],
    ["{a}, yet {b}", "while {a}, {b}", "{b}, despite the fact that {a}"],
)


@dataclass
class _Picker:
    """Draws from a ``(train, held_out)`` pool and records whether a held-out item was used."""

    rng: random.Random
    use_held_out: bool
    novel: bool = False

    def pick(self, pools: tuple[list, list]) -> object:
        train, held = pools
        if self.use_held_out and self.rng.random() < len(held) / (len(held) + len(train)) * 2:
            self.novel = True
            return self.rng.choice(held)
        return self.rng.choice(train)


def _copula(plural: bool) -> str:
    return "were" if plural else "was"


def _clause(p: _Picker, polarity: int) -> str:
    """One opinion clause with the given polarity (1 positive, 0 negative); maybe negated."""
    rng = p.rng
    negated = rng.random() < NEGATION_RATE
    surface = polarity ^ negated  # polarity of the words before negation
    subject, plural = p.pick(SUBJECTS)  # type: ignore[misc]
    kind = rng.random()
    if kind < 0.55:
        adj = p.pick(POSITIVE_ADJ if surface else NEGATIVE_ADJ)
        be = _copula(plural)
        if not negated:
            return f"{subject} {be} {p.pick(INTENSIFIERS)}{adj}"
        form = rng.randrange(3)
        if form == 0:
            return f"{subject} {be} not {p.pick(NEGATED_INTENSIFIERS)}{adj}"
        if form == 1:
            return f"{subject} {be} never {adj}"
        return f"I would not call {subject} {adj}"
    table = VERBS if kind < 0.8 else OUTCOMES
    same_polarity = ([x for x in table[0] if x[2] == surface], [x for x in table[1] if x[2] == surface])
    past, base, _ = p.pick(same_polarity)  # type: ignore[misc]
    if table is VERBS:
        return f"I did not {base} {subject}" if negated else f"I {past} {subject}"
    if not negated:
        return f"{subject} {past}"
    return f"{subject} never {past}" if rng.random() < 0.5 else f"{subject} did not {base}"


def _review(p: _Picker, label: int) -> str:
    rng = p.rng
    kind = rng.random()
    if kind < SINGLE_RATE:
        body = _clause(p, label)
    elif kind < SINGLE_RATE + CONTRAST_RATE:
        template = p.pick(CONTRASTS)
        body = template.format(a=_clause(p, 1 - label), b=_clause(p, label))  # type: ignore[union-attr]
    else:
        body = f"{_clause(p, label)} and {_clause(p, label)}"
    opener = p.pick(OPENERS)
    text = f"{opener}{body}." if opener else f"{body[0].upper()}{body[1:]}."
    return text


def generate(
    n: int, rng: random.Random, held_out: bool, exclude: set[str] | None = None
) -> list[tuple[str, str]]:
    """Generate ``n`` unique, label-balanced reviews.

    Args:
        n: Number of rows (even numbers give exactly balanced classes).
        rng: Source of randomness; the output is a pure function of its state.
        held_out: If True, every review contains at least one held-out item (validation split).
        exclude: Texts that must not appear (e.g. the training texts when making validation).

    Returns:
        ``(text, label_name)`` pairs in generation order.
    """
    seen = set(exclude or ())
    rows: list[tuple[str, str]] = []
    while len(rows) < n:
        label = len(rows) % 2
        picker = _Picker(rng, use_held_out=held_out)
        text = _review(picker, label)
        if text in seen or (held_out and not picker.novel):
            continue
        seen.add(text)
        rows.append((text, LABELS[label]))
    rng.shuffle(rows)
    return rows


def build(seed: int = SEED) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Build the train and validation splits exactly as shipped.

    Args:
        seed: Seed of the single ``random.Random`` that drives both splits.

    Returns:
        ``(train_rows, val_rows)``.
    """
    rng = random.Random(seed)
    train = generate(N_TRAIN, rng, held_out=False)
    val = generate(N_VAL, rng, held_out=True, exclude={t for t, _ in train})
    return train, val


def to_csv(rows: list[tuple[str, str]]) -> bytes:
    """Serialise rows as UTF-8 CSV with a ``text,label`` header and ``\\n`` line endings."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: regenerate (or ``--check``) the bundled demo files."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_peft.tasks.demo_data", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=DATA_DIR, help="output folder (default: the package data)"
    )
    parser.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    args = parser.parse_args(argv)
    train, val = build()
    outputs = {args.out / TRAIN_FILE.name: to_csv(train), args.out / VAL_FILE.name: to_csv(val)}
    if args.check:
        stale = [
            str(path) for path, data in outputs.items() if not path.is_file() or path.read_bytes() != data
        ]
        if stale:
            print("out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
        print("demo data up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for path, data in outputs.items():
        path.write_bytes(data)
        n_rows = data.count(b"\n") - 1
        print(f"wrote {path} ({n_rows} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
