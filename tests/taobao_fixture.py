"""A small synthetic Taobao UserBehavior CSV (user,item,category,behavior,timestamp; no header), for the tests and
the example smoke run: CI has no copy of the real data (research-only; never in the repository).

Each user has a few favourite categories and a propensity; on each of the dataset's nine days (Beijing time) an
active user views a handful of items (mostly of their favourite categories, sometimes an item viewed before) and
carts / favourites / buys some of them later that day; a few carts have no view, and two rows lie outside the
dataset's window (the noise rows of the real file). Rows are in (user, time) order, as in the real file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FIRST_DAY = 1511539200  # 2017-11-25 00:00 Beijing time (UTC+8), in unix seconds
DAY = 86_400


def write_taobao_csv(path, num_users: int = 60, num_items: int = 240, num_categories: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, num_users + 1):
        favourites = set(rng.choice(num_categories, size=3, replace=False).tolist())
        propensity = rng.uniform(0.05, 0.4)
        seen: list[int] = []
        active = rng.random(9) < 0.75
        active[rng.choice(9, size=2, replace=False)] = True  # at least two request days
        for day in np.flatnonzero(active):
            start = FIRST_DAY + int(day) * DAY
            times = np.sort(rng.integers(600, DAY - 4000, size=1 + rng.poisson(4)))
            for t in times:
                if seen and rng.random() < 0.2:
                    item = int(rng.choice(seen))
                elif rng.random() < 0.7:  # an item of a favourite category (item % num_categories)
                    copy = int(rng.integers(num_items // num_categories))
                    item = int(rng.choice(sorted(favourites))) + num_categories * copy
                else:
                    item = int(rng.integers(num_items))
                category = item % num_categories
                rows.append((user, item + 1, category + 1, "pv", start + int(t)))
                hit = propensity * (2.0 if category in favourites else 0.5) * (2.0 if item in seen else 1.0)
                if rng.random() < min(hit, 0.9):
                    behavior, later = str(rng.choice(["cart", "fav", "buy"])), int(rng.integers(1, 3000))
                    rows.append((user, item + 1, category + 1, behavior, start + int(t) + later))
                seen.append(item)
            if rng.random() < 0.1:  # a cart without a view that day: no candidate
                item = int(rng.integers(num_items))
                rows.append((user, item + 1, item % num_categories + 1, "cart", start + 300))
    rows.append((1, 7, 7, "pv", FIRST_DAY - 75 * DAY))  # 2017-09-11: noise, dropped by the reader
    rows.append((2, 8, 8, "pv", FIRST_DAY + 9 * DAY + 10))  # 2017-12-04 Beijing: after the window, dropped
    rows.sort(key=lambda r: (r[0], r[4]))
    path = Path(path)
    path.write_text("".join(f"{u},{i},{c},{b},{t}\n" for u, i, c, b, t in rows))
    return path
