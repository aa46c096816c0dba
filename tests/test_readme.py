"""Claims in README.md match the results files they quote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _summary(text: str) -> list[str]:
    """The rows of the benchmark's summary table (2% and 4%) in a markdown text."""
    head = "| scenario | method | 2%: forget drop (x random) |"
    assert head in text, "no summary table of the unlearning benchmark"
    part = text[text.index(head):]
    rows = []
    for line in part.splitlines():
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_readme_shows_the_unlearning_benchmarks_own_summary_table():
    written = (ROOT / "benchmarks" / "results" / "unlearning.md").read_text(encoding="utf-8")
    assert _summary(README) == _summary(written)


def test_readme_pilot_figures_match_the_pilot_results():
    runs = json.loads((ROOT / "benchmarks" / "results" / "snip_pilot.json").read_text())["runs"]
    both2, both4 = runs["snip-both evidence@2%"], runs["snip-both evidence@4%"]
    rnd2, rnd4 = runs["random@2%"], runs["random@4%"]
    m = re.search(r"the most at 2% \(([\d.]+) against random's ([\d.]+),\s+retain ([\d.]+); at 4% ([\d.]+) "
                  r"against ([\d.]+), retain ([\d.]+)\)", README)
    assert m, "the README states the pilot's figures for both kinds with the evidence match"
    got = [float(x) for x in m.groups()]
    want = [both2["forget_drop"], rnd2["forget_drop"], both2["retain_drop"], both4["forget_drop"],
            rnd4["forget_drop"], both4["retain_drop"]]
    assert got == [round(w, 3) for w in want]


@pytest.mark.parametrize("scenario, results", [("a", "snip_pilot_records.json"),
                                                ("b", "snip_pilot_records_german.json")])
def test_readme_pilot_figures_of_the_input_readings_match_their_results(scenario, results):
    runs = json.loads((ROOT / "benchmarks" / "results" / results).read_text())["runs"]
    both = [runs[f"snip-both evidence, word and token terms@{k}"] for k in ("2%", "4%")]
    rnd = [runs[f"random@{k}"] for k in ("2%", "4%")]
    pattern = (rf"on the pilot of \({scenario}\) ([\d.]+)x / ([\d.]+)x(?: as much as random at 2% / 4%)? "
               rf"\(([\d.]+) against (?:random's )?([\d.]+), retain ([\d.]+); at 4% ([\d.]+) against ([\d.]+), "
               rf"retain ([\d.]+)\)")
    m = re.search(pattern.replace(" ", r"\s+"), README)
    assert m, f"the README states the input readings' pilot figures on ({scenario})"
    got = [float(x) for x in m.groups()]
    want = [round(both[0]["forget_drop"] / rnd[0]["forget_drop"], 1), round(both[1]["forget_drop"] / rnd[1]["forget_drop"], 1),
            round(both[0]["forget_drop"], 3), round(rnd[0]["forget_drop"], 3), round(both[0]["retain_drop"], 3),
            round(both[1]["forget_drop"], 3), round(rnd[1]["forget_drop"], 3), round(both[1]["retain_drop"], 3)]
    assert got == want


def test_readme_forgetting_table_matches_the_forgetting_results():
    res = json.loads((ROOT / "benchmarks" / "results" / "forgetting.json").read_text())["scenarios"]
    rows = re.findall(r"^\| (code|German) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)(?: \(([\d.]+)\))? \|$",
                      README, flags=re.M)
    assert len(rows) == 8
    for scen, method, top1, in_dom, after, rec in rows:
        s = res["code" if scen == "code" else "german"]
        key = "none" if method == "unpruned" else method
        row = next(r for r in s["rows"] if r["method"] == key and (key == "none" or abs(r["k_percent"] - 4) < 0.01))
        rel = next(r for r in s["relearn"]["runs"] if r["method"] == method and r["form"] in ("exported", "none"))
        assert float(top1) == round(row["forget_top1"], 3) and float(in_dom) == round(row["greedy_forget_in_domain"], 2)
        assert float(after) == round(rel["forget_top1"][-1], 3)
        if rec:
            assert float(rec) == round(rel["recovery"][-1], 2)
