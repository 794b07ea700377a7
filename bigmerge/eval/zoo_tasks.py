"""The zoo's skills: deterministic training streams and held-out evaluation sets.

Four skills, each a prompt and an answer in plain ASCII (one byte is one token for the zoo's
byte-level tokenizer)::

    add   2-digit addition             "37+58="              -> "95"
    rev   reversing 3-6 letters        "rev kqzt="           -> "tzqk"
    sort  sorting 4-7 digits           "sort 31415="         -> "11345"
    fin   facts from "filings"         "Vantor Corp: city Oslo, ceo"  -> " Hale"

``fin`` is domain text: records of 32 invented companies, each with three facts (ceo, city,
ticker) listed in a shuffled order. The evaluation asks for the second field after
the first, in a field order that training never shows for that company, so the model must
recall the company's fact, not a memorised string.

The data do not depend on the zoo's seed: the skills are a fixed benchmark, the seed changes
only how models are trained. Evaluation items never occur in training (exact string for add,
rev and sort; the company's held-out field order for fin).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SKILLS = ("add", "rev", "sort", "fin")
DATA_VERSION = 1
DATA_SEED = 1234
EVAL_SIZE = 400  # items per skill in each held-out set (fin: 2 per company, 64)

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_SYL_A = ("Ar", "Bel", "Cor", "Dal", "Ex", "Fen", "Gal", "Hol", "Ir", "Jas", "Kel", "Lum", "Mor", "Nov", "Or", "Pra")
_SYL_B = (
    "vin",
    "tex",
    "dor",
    "mar",
    "lix",
    "sun",
    "ton",
    "rad",
    "quo",
    "bis",
    "nel",
    "gan",
    "ric",
    "zen",
    "pha",
    "lor",
)
_SUFFIX = ("Corp", "Inc", "Ltd", "Group", "Holdings", "Energy", "Labs", "Bank")
_CEOS = ("Hale", "Moss", "Reed", "Vance", "Quill", "Ortiz", "Brandt", "Okafor", "Lind", "Sato", "Novak", "Price")
_CITIES = ("Oslo", "Lima", "Porto", "Dakar", "Perth", "Quito", "Riga", "Kyoto", "Tunis", "Omaha", "Bern", "Cork")
FIELDS = ("ceo", "city", "ticker")
N_COMPANIES = 32


@dataclass(frozen=True)
class Item:
    """One example: the model reads ``prompt`` and should continue with ``answer``."""

    prompt: str
    answer: str

    def to_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer}


def _rng(stream: str) -> random.Random:
    # random.Random(str) hashes the string with SHA-512: stable across processes and versions.
    return random.Random(f"{DATA_SEED}/{DATA_VERSION}/{stream}")


# --- add -------------------------------------------------------------------------------------


def _add_item(a: int, b: int) -> Item:
    return Item(f"{a}+{b}=", str(a + b))


def _add_split() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    _rng("add-split").shuffle(pairs)
    return pairs[:EVAL_SIZE], pairs[EVAL_SIZE:]


# --- rev and sort: eval sets drawn first, training draws skip them -------------------------------


def _rev_item(rng: random.Random) -> Item:
    s = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
    return Item(f"rev {s}=", s[::-1])


def _sort_item(rng: random.Random) -> Item:
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 7)))
    return Item(f"sort {s}=", "".join(sorted(s)))


def _drawn_eval(skill: str) -> list[Item]:
    rng = _rng(f"{skill}-eval")
    make = _rev_item if skill == "rev" else _sort_item
    seen: set[str] = set()
    out: list[Item] = []
    while len(out) < EVAL_SIZE:
        it = make(rng)
        if it.prompt not in seen:
            seen.add(it.prompt)
            out.append(it)
    return out


# --- fin -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Company:
    name: str
    facts: dict[str, str]
    held_out: tuple[tuple[str, str], ...]  # (first, second) field orders kept for evaluation


def companies() -> list[Company]:
    rng = _rng("fin-companies")
    names: list[str] = []
    while len(names) < N_COMPANIES:
        n = f"{rng.choice(_SYL_A)}{rng.choice(_SYL_B)} {rng.choice(_SUFFIX)}"
        if n not in names:
            names.append(n)
    tickers: set[str] = set()
    out = []
    pairs = list(itertools.permutations(FIELDS, 2))
    for n in names:
        while True:
            t = "".join(rng.choice(_LETTERS.upper()) for _ in range(3))
            if t not in tickers:
                tickers.add(t)
                break
        facts = {"ceo": rng.choice(_CEOS), "city": rng.choice(_CITIES), "ticker": t}
        out.append(Company(n, facts, tuple(rng.sample(pairs, 2))))
    return out


def _record(c: Company, order: tuple[str, ...]) -> str:
    return f"{c.name}: " + ", ".join(f"{f} {c.facts[f]}" for f in order) + "."


def _fin_eval() -> list[Item]:
    out = []
    for c in companies():
        for first, second in c.held_out:
            out.append(Item(f"{c.name}: {first} {c.facts[first]}, {second}", f" {c.facts[second]}"))
    return out


def _fin_train(rng: random.Random, cos: list[Company]) -> Item:
    while True:
        c = rng.choice(cos)
        order = tuple(rng.sample(FIELDS, len(FIELDS)))
        if order[:2] not in c.held_out:
            # Domain text is learnt whole: an empty prompt puts every byte in the loss.
            return Item("", _record(c, order))


# --- public ----------------------------------------------------------------------------------


def eval_items(skill: str) -> list[Item]:
    """The held-out evaluation set of a skill, always the same items in the same order."""
    if skill == "add":
        return [_add_item(a, b) for a, b in _add_split()[0]]
    if skill in ("rev", "sort"):
        return _drawn_eval(skill)
    if skill == "fin":
        return _fin_eval()
    raise KeyError(skill)


def train_stream(skill: str, seed: int) -> Iterator[Item]:
    """An endless stream of training items of a skill, none of them an evaluation item."""
    rng = random.Random(f"{DATA_SEED}/{DATA_VERSION}/{skill}-train/{seed}")
    if skill == "add":
        pairs = _add_split()[1]
        while True:
            yield _add_item(*rng.choice(pairs))
    elif skill in ("rev", "sort"):
        held = {it.prompt for it in _drawn_eval(skill)}
        make = _rev_item if skill == "rev" else _sort_item
        while True:
            it = make(rng)
            if it.prompt not in held:
                yield it
    elif skill == "fin":
        cos = companies()
        while True:
            yield _fin_train(rng, cos)
    else:
        raise KeyError(skill)


def write_eval_files(out_dir: str | Path) -> dict[str, Path]:
    """Write ``zoo_<skill>.jsonl`` for every skill into out_dir; returns {skill: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for skill in SKILLS:
        p = out / f"zoo_{skill}.jsonl"
        text = "".join(json.dumps(it.to_json(), sort_keys=True) + "\n" for it in eval_items(skill))
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            tmp = p.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8", newline="\n")
            tmp.replace(p)
        paths[skill] = p
    return paths
