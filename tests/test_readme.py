"""Claims in README.md match the numbers printed next to them."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_demo_claim_of_how_much_more_forget_falls_matches_the_table():
    rows = re.findall(r"^\| (\w+) \| ([\d.]+%?) \| ([\d.]+) \| ([\d.]+) \|$", README, flags=re.M)
    table = {(m, k): (float(f), float(r)) for m, k, f, r in rows}
    base_f, base_r = table[("none", "0")]
    ratios = [(base_f - f) / (base_r - r) for (m, _), (f, r) in table.items() if m in ("activation", "hybrid")]
    assert len(ratios) == 4
    m = re.search(r"forget top-1 falls ([\d.]+)–([\d.]+) times\s+as much as retain top-1", README)
    assert m, "the README states how much more forget top-1 falls than retain top-1"
    assert (float(m.group(1)), float(m.group(2))) == (round(min(ratios), 1), round(max(ratios), 1))
