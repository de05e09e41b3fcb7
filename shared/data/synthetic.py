"""Seeded synthetic data whose item texts carry the users' preferences.

Each item belongs to one topic and its title is made of that topic's words, so a text model can
learn who likes what; popularity alone cannot (items are equally popular in expectation across
topics). Users prefer one or two topics; their profile names a favourite topic for 70% of users.
Small enough that tests train on it in seconds. Run: ``fedrec data synth /tmp/synth``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedrec.shared.data.layout import write_dataset

TOPICS = {
    "space": ["galaxy", "rocket", "astronaut", "orbit", "alien", "nebula", "planet", "comet"],
    "romance": ["love", "wedding", "heart", "kiss", "paris", "letter", "darling", "promise"],
    "crime": ["detective", "heist", "gangster", "murder", "alibi", "police", "noir", "ransom"],
    "cooking": ["kitchen", "recipe", "chef", "bakery", "spice", "feast", "dinner", "oven"],
    "sports": ["champion", "stadium", "goal", "coach", "marathon", "boxing", "league", "medal"],
    "horror": ["ghost", "haunted", "zombie", "curse", "vampire", "shadow", "scream", "crypt"],
}
FILLER = ["the", "story", "night", "return", "last", "secret", "city", "journey", "day", "world"]


def generate(
    out: str | Path,
    *,
    n_users: int = 60,
    n_items: int = 90,
    n_topics: int = 4,
    min_interactions: int = 8,
    max_interactions: int = 20,
    seed: int = 0,
) -> Path:
    """Write a fedrec data folder at ``out`` and return it. Same seed, same bytes."""
    if not 1 <= n_topics <= len(TOPICS):
        raise ValueError(f"n_topics={n_topics} must be between 1 and {len(TOPICS)}")
    if min_interactions < 1 or max_interactions < min_interactions:
        raise ValueError("need 1 <= min_interactions <= max_interactions")
    if max_interactions > n_items:
        raise ValueError(f"max_interactions={max_interactions} exceeds n_items={n_items}")
    rng = np.random.default_rng(seed)
    names = list(TOPICS)[:n_topics]
    item_topic = rng.integers(0, n_topics, size=n_items)
    items = {}
    for i in range(n_items):
        words = rng.choice(TOPICS[names[item_topic[i]]], size=2, replace=False)
        title = f"{rng.choice(FILLER)} {words[0]} {words[1]}".title()
        items[i + 1] = {"title": title, "genres": names[item_topic[i]]}
    interactions = []
    users = {}
    t0 = 1_600_000_000
    for u in range(1, n_users + 1):
        pref = rng.dirichlet(np.full(n_topics, 0.3))  # peaked: one or two topics dominate
        p = pref[item_topic] + 0.02  # a little noise so every item can appear
        p /= p.sum()
        n = int(rng.integers(min_interactions, max_interactions + 1))
        chosen = rng.choice(n_items, size=n, replace=False, p=p)
        times = t0 + np.sort(rng.integers(0, 10_000_000, size=n))
        interactions += [(u, int(i) + 1, int(t), float(rng.integers(1, 6)))
                         for i, t in zip(chosen, times, strict=True)]  # fmt: skip
        fav = names[int(np.argmax(pref))] if rng.random() < 0.7 else "many things"
        users[u] = {"age": str(int(rng.integers(18, 70))), "favourite": fav}
    interactions.sort(key=lambda r: r[2])  # file in global time order, like a log export
    meta = {
        "name": f"synthetic-{seed}",
        "item_text_template": "{title}. Genre: {genres}",
        "user_text_template": "Age {age}, likes {favourite}.",
    }
    return write_dataset(out, interactions=interactions, items=items, users=users, meta=meta)
