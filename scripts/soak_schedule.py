#!/usr/bin/env python3
"""The soak's fault schedule (scripts/soak.sh): one line per event, `<ms after start> <kind> [args]`,
sorted by time. Deterministic for a given seed.

    soak_schedule.py DURATION_S KILLS SHORT_S SHORT_MODE LONG_S LONG_MODE PG_RESTARTS PG_TERMINATES \
                     CONSUMER_KILLS CONSUMER_CRASHES SEED

Placement, as fractions of the writing time D:
  - the short outage begins at 0.10 D, the long one at 0.40 D (moved earlier if it would not end
    before 0.97 D);
  - relay SIGKILLs are spread evenly, with jitter, over [0.05 D, 0.97 D], outages included;
  - PostgreSQL restarts, backend terminations, consumer SIGKILLs and consumer crashes after commit
    are spread evenly, interleaved, over the time outside the outages (a few seconds of margin), so
    that the recovery measured after each is its own.
"""

import random
import sys


def main():
    (d, kills, s_len, s_mode, l_len, l_mode, n_pgr, n_pgt, n_ck, n_cc, seed) = sys.argv[1:12]
    d, kills, s_len, l_len = float(d), int(kills), float(s_len), float(l_len)
    n_pgr, n_pgt, n_ck, n_cc = int(n_pgr), int(n_pgt), int(n_ck), int(n_cc)
    rnd = random.Random(seed)
    start, end = max(5.0, 0.05 * d), 0.97 * d
    short_at = max(start, 0.10 * d)
    long_at = max(short_at + s_len + 10, 0.40 * d)
    if long_at + l_len > end:
        long_at = end - l_len
    if long_at < short_at + s_len + 5:
        sys.exit(f"soak_schedule: outages of {s_len:.0f}s and {l_len:.0f}s do not fit in {d:.0f}s")
    events = []
    outages = [(short_at, s_len, s_mode, "short"), (long_at, l_len, l_mode, "long")]
    for at, length, mode, name in outages:
        events.append((at, "outage_start", name, mode, int(length)))
        events.append((at + length, "outage_end", name, mode))
    step = (end - start) / max(kills, 1)
    for j in range(kills):
        events.append((start + (j + 0.5 + rnd.uniform(-0.35, 0.35)) * step, "relay_kill"))
    # The time outside the outages, with margins.
    windows, cursor = [], start
    for at, length, _, _ in outages:
        if at - 3 > cursor:
            windows.append((cursor, at - 3))
        cursor = max(cursor, at + length + 8)
    if end > cursor:
        windows.append((cursor, end))
    free = sum(b - a for a, b in windows)

    def place(x):
        for a, b in windows:
            if x <= b - a:
                return a + x
            x -= b - a
        return windows[-1][1]

    kinds = [("pg_restart", n_pgr), ("consumer_kill", n_ck), ("pg_terminate", n_pgt), ("consumer_crash", n_cc)]
    placed = []  # (offset in the free time, kind, args)
    for k, (kind, n) in enumerate(kinds):
        phase = (k + 1) / (len(kinds) + 1)
        for j in range(n):
            x = (j + phase + rnd.uniform(-0.08, 0.08)) / n * free
            args = ("relays" if j % 2 == 0 else "all",) if kind == "pg_terminate" else ()
            placed.append((min(max(x, 0), free), kind) + args)
    # Keep these apart (up to 8 s, less when the free time is short), in free time.
    placed.sort(key=lambda e: e[0])
    gap = min(8.0, free / (2 * max(len(placed), 1)))
    for i in range(1, len(placed)):
        if placed[i][0] < placed[i - 1][0] + gap:
            placed[i] = (min(placed[i - 1][0] + gap, free),) + placed[i][1:]
    events.extend((place(e[0]),) + e[1:] for e in placed)
    events.sort(key=lambda e: e[0])
    for e in events:
        print(int(e[0] * 1000), *e[1:])


if __name__ == "__main__":
    main()
