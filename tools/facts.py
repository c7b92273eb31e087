"""Fictional facts for tools/bench_facts.py: seeded people, their documents in two writing
styles, probes of four kinds, and real facts the base model already knows.

Nothing is downloaded: names, towns and years are made up from syllables (so the model cannot
know them), and a probe's answer is read back from the entity, never written by hand.

    >>> people = make_people(8, seed=0)
    >>> doc = biography(people[0]); people[0].name in doc.text and people[0].town in doc.text
    True
    >>> [p.kind for p in probes(people[0], people)][:4]
    ['P1', 'P1', 'P1', 'P1']
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from knnstore.lm_eval_tasks.utils import normalise, states  # noqa: F401  (the benchmark's answer match)

FIRST_START = ("Bre", "Cal", "Dor", "Elv", "Fen", "Gar", "Hal", "Isk", "Jor", "Kel", "Lor", "Mar", "Nev", "Orv",
               "Per", "Quin", "Ros", "Sel", "Tam", "Ulv", "Var", "Wyn", "Yor", "Zan")
FIRST_END = ("a", "en", "ia", "o", "is", "an", "ette", "wyn", "ric", "mund", "ora", "ith")
LAST_START = ("Ash", "Brock", "Crane", "Dun", "Ember", "Fal", "Grim", "Hollow", "Ivy", "Jast", "Kettle", "Lark",
              "Moss", "Nettle", "Orm", "Pike", "Quill", "Rook", "Sorrel", "Thistle", "Umber", "Vale", "Wick",
              "Yarrow")
LAST_END = ("by", "wood", "ford", "ley", "ridge", "stone", "well", "mere", "ton", "croft", "thorpe", "hurst")
TOWN_START = ("Bram", "Cor", "Dun", "Els", "Fern", "Glen", "Hart", "Kil", "Lang", "Mor", "Ness", "Ost", "Pen",
              "Ryd", "Stan", "Thorn", "Wex", "Yar", "Brid", "Caer", "Drum", "Fal", "Hex", "Lud")
TOWN_END = ("wick", "moor", "haven", "dale", "bury", "stead", "holm", "mouth", "field", "combe", "ness", "gate")
TRADES = ("glassblower", "cartographer", "clockmaker", "bookbinder", "beekeeper", "shipwright", "astronomer",
          "apothecary", "stonemason", "weaver", "violinist", "botanist", "engraver", "cooper", "surveyor",
          "tanner", "lacemaker", "printer", "falconer", "potter", "locksmith", "organ builder", "mapmaker",
          "saddler")


@dataclass(frozen=True)
class Person:
    """A fictional person: the attributes the documents state and the probes ask for."""

    index: int
    name: str
    town: str
    year: int
    trade: str
    teacher: str  # another person's name (the two-hop probes go through it)
    age: int  # stated, never asked (a sentence that is not a probed fact)
    style: int  # which of the biography's sentence templates it uses

    @property
    def article(self) -> str:
        return "an" if self.trade[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Document:
    person: int
    kind: str  # "biography" (prose) or "record" (a registry entry)
    title: str
    text: str


@dataclass(frozen=True)
class Probe:
    """A prompt whose greedy continuation should state ``answer``."""

    person: int  # whose fact it asks for
    kind: str  # P1 stored wording, P2 paraphrase, P3 question, P4 two-hop question
    attribute: str  # town, year, trade, teacher
    prompt: str
    answer: str
    source_person: int  # whose documents hold the answer (the teacher's, for a two-hop probe)


def _names(rng: random.Random, n: int, parts: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        name = " ".join(rng.choice(a) + rng.choice(b) for a, b in parts)
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def make_people(n: int, seed: int = 0) -> list[Person]:
    """``n`` fictional people with distinct names; each one's teacher is another of them."""
    rng = random.Random(seed)
    names = _names(rng, n, [(FIRST_START, FIRST_END), (LAST_START, LAST_END)])
    towns = _names(rng, max(1, n // 2 + 1), [(TOWN_START, TOWN_END)])  # some people share a town
    teachers = list(range(n))
    rng.shuffle(teachers)
    # a derangement by rotation of a shuffled order: nobody teaches themself
    teacher_of = {teachers[i]: teachers[(i + 1) % n] for i in range(n)} if n > 1 else {0: 0}
    return [Person(index=i, name=names[i], town=rng.choice(towns), year=rng.randint(1700, 1899),
                   trade=rng.choice(TRADES), teacher=names[teacher_of[i]], age=rng.randint(40, 95),
                   style=rng.randint(0, 1)) for i in range(n)]


# The biography's sentences, two templates each: (sentence, the prefix up to the answer).
def _bio_sentences(p: Person) -> list[tuple[str, str, str]]:
    """(attribute, sentence, its stored wording up to the answer) of a biography."""
    if p.style == 0:
        return [("town", f"{p.name} was born in {p.town} in {p.year}.", f"{p.name} was born in"),
                ("year", "", f"{p.name} was born in {p.town} in"),
                ("trade", f"{p.name} worked as {p.article} {p.trade} for most of a long life.",
                 f"{p.name} worked as {p.article}"),
                ("teacher", f"{p.name} learned the craft from {p.teacher}.", f"{p.name} learned the craft from"),
                ("age", f"{p.name} died at the age of {p.age}.", "")]
    return [("town", f"{p.name} was born in the town of {p.town} in the year {p.year}.",
             f"{p.name} was born in the town of"),
            ("year", "", f"{p.name} was born in the town of {p.town} in the year"),
            ("trade", f"{p.name} earned a living as {p.article} {p.trade}.", f"{p.name} earned a living as {p.article}"),
            ("teacher", f"{p.name} was trained by {p.teacher}.", f"{p.name} was trained by"),
            ("age", f"{p.name} lived to {p.age}.", "")]


def biography(p: Person) -> Document:
    text = " ".join(s for _, s, _ in _bio_sentences(p) if s)
    return Document(p.index, "biography", f"{p.name} (biography)", text)


def record(p: Person) -> Document:
    """The same facts in another writing style: a registry entry."""
    text = (f"Registry entry for {p.name}.\nPlace of birth: {p.town}\nYear of birth: {p.year}\n"
            f"Occupation: {p.trade}\nApprenticed to: {p.teacher}\nAge at death: {p.age}\n")
    return Document(p.index, "record", f"{p.name} (record)", text)


def documents(people: list[Person]) -> list[Document]:
    return [d for p in people for d in (biography(p), record(p))]


ATTRIBUTES = ("town", "year", "trade", "teacher")
KINDS = ("P1", "P2", "P3", "P4")
KIND_NAMES = {"P1": "stored wording", "P2": "paraphrase", "P3": "question", "P4": "two-hop question"}


def _answer(p: Person, attribute: str) -> str:
    return str(getattr(p, attribute))


def probes(p: Person, people: list[Person]) -> list[Probe]:
    """Thirteen probes of one person: the four attributes asked three ways (P1-P3), and the
    town of their teacher (P4)."""
    stored = {a: prefix for a, _, prefix in _bio_sentences(p) if a in ATTRIBUTES}
    paraphrase = {"town": f"The birthplace of {p.name} is the town of",
                  "year": f"The year of {p.name}'s birth was",
                  "trade": f"By profession, {p.name} was {p.article}",
                  "teacher": f"The master who taught {p.name} was"}
    question = {"town": f"Question: In which town was {p.name} born?\nAnswer:",
                "year": f"Question: In which year was {p.name} born?\nAnswer:",
                "trade": f"Question: What was {p.name}'s occupation?\nAnswer:",
                "teacher": f"Question: Who taught {p.name} the craft?\nAnswer:"}
    out = []
    for kind, prompts in (("P1", stored), ("P2", paraphrase), ("P3", question)):
        out += [Probe(p.index, kind, a, prompts[a], _answer(p, a), p.index) for a in ATTRIBUTES]
    teacher = next(q for q in people if q.name == p.teacher)
    out.append(Probe(p.index, "P4", "town", f"Question: In which town was the teacher of {p.name} born?\nAnswer:",
                     teacher.town, teacher.index))
    return out


def write_documents(people: list[Person], path: Path) -> None:
    """The people's documents as a ``.jsonl`` corpus (``knnstore add-corpus``): id, title, text,
    and the person and style kept as metadata."""
    with open(path, "w", encoding="utf-8") as f:
        for d in documents(people):
            f.write(json.dumps({"id": f"{d.person}-{d.kind}", "title": d.title, "text": d.text,
                                "person": d.person, "kind": d.kind}) + "\n")


def write_probes(people: list[Person], path: Path) -> None:
    """Every probe of the people as ``.jsonl`` (what the lm-eval task ``knnstore_facts`` asks)."""
    with open(path, "w", encoding="utf-8") as f:
        for p in people:
            for probe in probes(p, people):
                f.write(json.dumps(asdict(probe)) + "\n")


# Real facts for control C1: the benchmark keeps the first 100 the base model states.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "England": "London", "Egypt": "Cairo", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest",
    "the Czech Republic": "Prague", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Canada": "Ottawa",
    "Australia": "Canberra", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Chile": "Santiago", "Colombia": "Bogotá", "Venezuela": "Caracas", "Cuba": "Havana", "Kenya": "Nairobi",
    "Ethiopia": "Addis Ababa", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Turkey": "Ankara",
    "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus", "Lebanon": "Beirut", "Israel": "Jerusalem",
    "Saudi Arabia": "Riyadh", "India": "New Delhi", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "the Philippines": "Manila", "Indonesia": "Jakarta",
    "South Korea": "Seoul", "North Korea": "Pyongyang", "Afghanistan": "Kabul", "Nepal": "Kathmandu",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Scotland": "Edinburgh", "Wales": "Cardiff", "Iceland": "Reykjavik", "Switzerland": "Bern",
    "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Brazil": "Brasília", "Uruguay": "Montevideo",
    "Paraguay": "Asunción", "Bolivia": "La Paz", "Ecuador": "Quito", "Jamaica": "Kingston", "Libya": "Tripoli",
    "Tunisia": "Tunis", "Algeria": "Algiers", "Sudan": "Khartoum", "Senegal": "Dakar", "Zimbabwe": "Harare",
    "Uganda": "Kampala", "Tanzania": "Dodoma", "Qatar": "Doha", "Jordan": "Amman", "Armenia": "Yerevan",
    "Georgia": "Tbilisi", "Mongolia": "Ulaanbaatar", "Estonia": "Tallinn", "Latvia": "Riga",
    "Lithuania": "Vilnius", "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "New Zealand": "Wellington",
}
OTHER_FACTS = (
    ("The largest planet in the solar system is", "Jupiter"),
    ("The planet closest to the Sun is", "Mercury"),
    ("The Red Planet is", "Mars"),
    ("Romeo and Juliet was written by William", "Shakespeare"),
    ("The theory of relativity was developed by Albert", "Einstein"),
    ("The first President of the United States was George", "Washington"),
    ("The chemical symbol for water is", "H2O"),
    ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("The Great Wall is in", "China"),
    ("The Eiffel Tower is in", "Paris"),
    ("The Statue of Liberty is in New", "York"),
    ("The longest river in Africa is the", "Nile"),
    ("The official language of Brazil is", "Portuguese"),
    ("The official language of Mexico is", "Spanish"),
    ("The currency of Japan is the", "yen"),
    ("The currency of the United Kingdom is the pound", "sterling"),
    ("Water freezes at zero degrees", "Celsius"),
    ("The opposite of hot is", "cold"),
    ("Monday, Tuesday,", "Wednesday"),
    ("January, February,", "March"),
    ("The Pacific is an", "ocean"),
    ("Sherlock Holmes was created by Arthur Conan", "Doyle"),
    ("The author of Pride and Prejudice is Jane", "Austen"),
    ("The composer of the Moonlight Sonata is Ludwig van", "Beethoven"),
    ("Harry Potter was written by J.K.", "Rowling"),
)


def real_facts() -> list[tuple[str, str]]:
    """Candidate real facts (prompt, answer), in a fixed order."""
    return [(f"The capital of {country} is", city) for country, city in CAPITALS.items()] + list(OTHER_FACTS)


def main() -> None:
    """Write the documents and probes of ``--people`` people (the data the lm-eval task files
    ship: ``python tools/facts.py --people 60 --out knnstore/lm_eval_tasks``)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--people", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    people = make_people(args.people, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_documents(people, args.out / "facts_documents.jsonl")
    write_probes(people, args.out / "facts_probes.jsonl")
    print(f"wrote {len(people) * 2} documents and {len(people) * 13} probes to {args.out}")


if __name__ == "__main__":
    main()
