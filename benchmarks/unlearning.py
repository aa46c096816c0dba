"""Multi-scenario unlearning benchmark on SmolLM2-135M: does each selection method remove the forget set's
skill and keep the retain set's, on text no one here wrote?

Scenarios (forget vs retain), all real text that installs offline:

- a ``code-vs-prose``: CPython standard-library source vs the English prose of ``pydoc_data`` (the demo);
- b ``german-vs-english``: Debian ``fortunes-de`` vs English ``fortunes``;
- c ``italian-vs-english``: Debian ``fortunes-it`` vs English ``fortunes``;
- d ``scripture-vs-english``: the King James Bible (``bible-kjv``, one chapter per document) vs English
  ``fortunes``.

A fortune file holds entries separated by lines that hold only ``%``; each entry is one document (``.dat``
index files and ``.u8`` links are skipped, as are symbolic links to files already read). Every scenario is
one ``snip_lens.sweep.run_sweep``: the documents are split into selection and held-out evaluation parts
before anything is collected, and every method is measured on the held-out windows. Methods: random (three
seeds), activation (Pochinkov & Schoots), attribution (first-order ablation effect), snip with each
explanation kind the library offers (matched by evidence, the default), with ``--embedding-match`` also snip
on the default kind matched by sentence embeddings (the paper's score), and hybrid; k = 0.5%, 1%, 2%, 4% of the 46,080 neurons. SNIP's
configuration is the library's default, the same for every scenario (none is tuned to a scenario): its
kind and match were fixed on a pilot split of scenario a (``benchmarks/snip_pilot.py``) before scenarios b-d
were run; its token term weights were added later, chosen on pilot splits of a and b (documents split with
seed 1; this benchmark splits with seed 0), after b's results had been seen; so were its input readings
(the activation-weighted peaks of 64 top windows and the activity over 32 random windows), after all four
scenarios had been seen with the earlier readings.
Random is the baseline measured in the same run: the table gives each method's forget top-1 drop as a
multiple of random's (mean of three seeds) at the same k.

A second part compares mask modes on scenario a (zero, mean, scale:-1) for the activation and attribution
selections at k = 2% and 4% (Farrell et al. 2024 found zero-ablation weak where negative scaling worked).

Installs: the Debian packages ``fortunes fortunes-de fortunes-it bible-kjv`` when their files are missing
(``apt-get install -y ...``, run by this script when it is root; otherwise it stops and prints the command).

Resumable: each sweep keeps its intermediates (activations, explanations, scores) and its ``results.json``
under ``--work`` (default ``out/unlearning``); a rerun skips finished sweeps and resumes unfinished ones.
Writes ``benchmarks/results/unlearning.json`` (``{"scenarios": [...]}``, each in the sweep's ``results.json``
schema plus the scenario's name, sources and config), ``benchmarks/results/unlearning/<scenario>/*.png``
(one set of plots per scenario) and ``benchmarks/results/unlearning.md`` (the summary table, also printed).

    python benchmarks/unlearning.py [--scenarios a,b,c,d] [--work out/unlearning] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FORTUNES = Path("/usr/share/games/fortunes")
KS = ["0.5%", "1%", "2%", "4%"]
RANDOM_SEEDS = (0, 1, 2)
MASK_MODES = ("zero", "mean", "scale:-1")
MASK_MODE_METHODS = ["activation", "attribution"]
MASK_MODE_KS = ["2%", "4%"]
APT_PACKAGES = ["fortunes", "fortunes-de", "fortunes-it", "bible-kjv"]

logger = logging.getLogger("unlearning")


# ---- data ------------------------------------------------------------------------------------------


def ensure_installed() -> None:
    """Install the Debian text packages if their files are missing (root), else stop with the command."""
    missing = []
    if not (FORTUNES / "fortunes").is_file():
        missing.append("fortunes")
    if not (FORTUNES / "de").is_dir():
        missing.append("fortunes-de")
    if not (FORTUNES / "it").is_dir():
        missing.append("fortunes-it")
    if shutil.which("bible") is None:
        missing.append("bible-kjv")
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"this benchmark reads text from Debian packages {missing}; install them with\n"
                         f"    sudo {' '.join(cmd)}")
    print(f"installing {missing} ...", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(cmd, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _fortune_files(directory: Path) -> list[Path]:
    """Plain fortune files directly in ``directory``: no .dat indexes, .u8 links or repeated targets."""
    seen: set[Path] = set()
    files = []
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.suffix in (".dat", ".u8"):
            continue
        real = p.resolve()
        if real in seen or (p.is_symlink() and real.parent != directory.resolve()):
            continue  # a link into another language's directory, or a second name for a file already read
        seen.add(real)
        files.append(p)
    if not files:
        raise SystemExit(f"no fortune files in {directory}; install them: apt-get install -y {' '.join(APT_PACKAGES)}")
    return files


def clean_fortune(text: str) -> str:
    """Fortune text as plain text: overstrike (character, backspace) pairs, used for bold and underline on
    terminals, keep the character written last; other control characters (bells) are dropped."""
    text = re.sub(r".\x08", "", text)
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)


def fortune_entries(directory: Path) -> list[str]:
    """Every entry of every fortune file in ``directory`` (entries end at a line holding only ``%``)."""
    out = []
    for f in _fortune_files(directory):
        text = f.read_text(encoding="utf-8", errors="replace")
        text = clean_fortune(text)
        for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            if entry.strip():
                out.append(entry.strip("\n"))
    return out


def kjv_chapters() -> list[str]:
    """The King James Bible through the ``bible`` program, one document per chapter, verse numbers dropped."""
    text = subprocess.run(["bible", "-l0", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL).stdout
    chapters: list[list[str]] = []
    for line in text.splitlines():
        m = re.match(r"^\s+(\d+)\s+(.*)$", line)  # verses are indented; headings ("1 Samuel 3") are not
        if m and chapters:
            chapters[-1].append(m.group(2).strip())
        elif re.match(r"^\S.* \d+$", line.strip()):  # a "Genesis 1" heading starts a chapter
            chapters.append([])
    docs = [" ".join(c) for c in chapters if c]
    if len(docs) < 1000:
        raise SystemExit(f"the bible program printed only {len(docs)} chapters; is bible-kjv installed intact?")
    return docs


def write_jsonl(path: Path, texts: list[str]) -> str:
    from snip_lens._io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return str(path)


@dataclass
class Scenario:
    """One forget/retain pair."""

    key: str
    """Short key used on the command line (a, b, c, d)."""
    name: str
    """Name in results and file names."""
    forget_desc: str
    """What the forget text is and where it comes from."""
    retain_desc: str
    """What the retain text is and where it comes from."""
    forget: Callable[[], list[str]] | str
    """A corpus spec understood by the sweep ("code", "prose"), or a function returning the documents."""
    retain: Callable[[], list[str]] | str
    """Same for the retain side."""


SCENARIOS = [
    Scenario("a", "code-vs-prose", "CPython standard-library .py source (one file per document)",
             "pydoc_data.topics English prose (one topic per document)", "code", "prose"),
    Scenario("b", "german-vs-english", "fortunes-de entries (/usr/share/games/fortunes/de)",
             "English fortunes entries (/usr/share/games/fortunes)",
             lambda: fortune_entries(FORTUNES / "de"), lambda: fortune_entries(FORTUNES)),
    Scenario("c", "italian-vs-english", "fortunes-it entries (/usr/share/games/fortunes/it)",
             "English fortunes entries (/usr/share/games/fortunes)",
             lambda: fortune_entries(FORTUNES / "it"), lambda: fortune_entries(FORTUNES)),
    Scenario("d", "scripture-vs-english", "King James Bible via `bible` (bible-kjv), one chapter per document",
             "English fortunes entries (/usr/share/games/fortunes)",
             kjv_chapters, lambda: fortune_entries(FORTUNES)),
]


# ---- sweeps ----------------------------------------------------------------------------------------


def snip_variants() -> list[tuple[str, dict[str, Any]]]:
    """(method label, SweepConfig overrides) for each explanation kind the library's sweep offers.

    With an ``explanations`` setting (input / output / both) every kind is its own snip run; without one
    the sweep's single explainer is the only kind. The first variant is the sweep's default, which the
    main sweep (and so the hybrid) uses.
    """
    from snip_lens.sweep import SweepConfig

    fields = {f.name: f for f in dataclasses.fields(SweepConfig)}
    if "explanations" not in fields:
        return [("snip", {})]
    default = SweepConfig().explanations  # type: ignore[attr-defined]
    kinds = [default] + [k for k in ("input", "output", "both") if k != default]
    out = [(f"snip-{k}", {"explanations": k}) for k in kinds]
    if EMBEDDING_MATCH and "match" in fields and SweepConfig().match != "embedding":  # type: ignore[attr-defined]
        # the paper's score (max cosine of sentence embeddings) on the default kind, for comparison
        out.append((f"snip-{default}-embedding", {"explanations": default, "match": "embedding"}))
    return out


EMBEDDING_MATCH = False
"""Set by ``--embedding-match``: also run SNIP with the paper's embedding match (embeds 46k explanations per
scenario, minutes each on a CPU; ``benchmarks/snip_pilot.py`` compares the matches on a sample)."""


def _share(src: Path, dst: Path, names: list[str]) -> None:
    """Hard-link finished intermediates of ``src`` into ``dst`` so a sibling sweep on the same windows
    reuses them (the stages check their own config hashes; files are replaced atomically, never edited)."""
    dst.mkdir(parents=True, exist_ok=True)
    # The sweep reuses an artifact only when config.json says which config made it; the sibling's own
    # config (or a later rerun's) replaces this copy when the sweep starts.
    names = names + (["config.json"] if not (dst / "results.json").exists() else [])
    for n in names:
        s, d = src / n, dst / n
        if not s.exists() or d.exists():
            continue
        try:
            if s.is_dir():
                shutil.copytree(s, d, copy_function=os.link)
            else:
                os.link(s, d)
        except OSError:
            if s.is_dir():
                shutil.copytree(s, d)
            else:
                shutil.copy2(s, d)


def _same(old: Any, new: Any) -> bool:
    """Configs agree on every setting both have (a setting added to the library since, at its default,
    does not invalidate a finished sweep of the methods that ignore it)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(_same(old[k], new[k]) for k in old.keys() & new.keys())
    return old == new


class NotFinished(Exception):
    """A sweep that has not finished (raised instead of running it, with ``--report-only``)."""


REPORT_ONLY = False
"""Set by ``--report-only``: gather finished sweeps, run nothing."""


def run_one(config: Any, out: Path, model: Any) -> dict:
    """``run_sweep`` into ``out``, or its finished ``results.json`` when this config already ran there."""
    from snip_lens.sweep import run_sweep

    done = out / "results.json"
    # the sweep saves the staged RunConfig, so compare in that form (a flat SweepConfig has other keys)
    staged = config.to_run_config() if hasattr(config, "to_run_config") else config
    new = json.loads(json.dumps(staged.to_json(), default=str))
    old = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    if old is not None and "llm-judge" not in config.methods:  # a judge setting cannot change these results
        for d in (old, old.get("select", {}), new, new.get("select", {})):
            d.pop("judge_candidates", None)
    if done.exists() and old is not None and _same(old, new):
        return json.loads(done.read_text())
    if REPORT_ONLY:
        raise NotFinished(str(out))
    t = time.perf_counter()
    try:
        res = run_sweep(config, out, model=model, progress=True)
    except FileExistsError:  # an unfinished sweep of an older config: start that sweep afresh
        res = run_sweep(config, out, model=model, progress=True, overwrite=True)
    logger.info("%s: %.0f s", out, time.perf_counter() - t)
    return res


BASELINE_METHODS = ["activation", "attribution", "random"]

BASELINE_RECORDS = {"top_k_records": 20, "random_records": 5}
"""Records settings of the baseline sweeps. The baselines read only the activation statistics (and gradients),
which no records setting changes, so they keep the small records they ran with: a change to the explainer's
records defaults reruns the snip sweeps (which collect their own records), not the baselines."""


def run_scenario(sc: Scenario, model: Any, work: Path, sizes: dict[str, int], *, snip: bool = True) -> dict:
    """Every method at every k on one scenario; returns the sweep's results dict plus scenario fields.

    Sweeps: the non-interpretable methods (activation, attribution, random seed 0); random seeds 1 and 2;
    snip and hybrid with the default explanation kind; snip with each other kind. The baselines share one
    collection (:data:`BASELINE_RECORDS`), the snip sweeps another (the explainer's records settings).
    """
    from snip_lens.sweep import DataConfig, SweepConfig

    base = work / sc.name
    specs = {}
    for side in ("forget", "retain"):
        src = getattr(sc, side)
        path = base / "data" / f"{side}.jsonl"
        specs[side] = src if isinstance(src, str) else (str(path) if path.exists() else write_jsonl(path, src()))
    data = DataConfig(forget=specs["forget"], retain=specs["retain"], n_ctx=sizes["n_ctx"],
                      select_windows=sizes["select_windows"], eval_windows=sizes["eval_windows"], seed=0)
    first = base / "baselines"
    main_cfg = SweepConfig(data=data, methods=BASELINE_METHODS, ks=KS, seed=RANDOM_SEEDS[0], **BASELINE_RECORDS)
    main = run_one(main_cfg, first, model)
    runs = [{**r, "seed": RANDOM_SEEDS[0]} if r["method"] == "random" else dict(r) for r in main["runs"]]
    configs = {"baselines": main_cfg.to_json()}
    missing = []
    for seed in RANDOM_SEEDS[1:]:
        d = base / f"random-seed{seed}"
        _share(first, d, ["records"])
        cfg = SweepConfig(data=data, methods=["random"], ks=KS, seed=seed, **BASELINE_RECORDS)
        try:
            res = run_one(cfg, d, model)
        except NotFinished:
            missing.append(f"random seed {seed}")
            continue
        runs += [{**r, "seed": seed} for r in res["runs"]]
    variants = snip_variants() if snip else []
    for i, (label, over) in enumerate(variants):
        d = base / label
        if i:  # the first snip sweep's records (the explainer's settings) and embeddings of texts seen before
            _share(base / variants[0][0], d, ["records", "cache"])
        cfg = SweepConfig(data=data, methods=["snip", "hybrid"] if i == 0 else ["snip"], ks=KS,
                          seed=RANDOM_SEEDS[0], **over)
        configs[label] = cfg.to_json()
        try:
            res = run_one(cfg, d, model)
        except NotFinished:
            missing.append(label + (" and hybrid" if i == 0 else ""))
            continue
        runs += [{**r, "method": label} if r["method"] == "snip" else dict(r) for r in res["runs"]]
    return {"name": sc.name, "key": sc.key, "forget_source": sc.forget_desc, "retain_source": sc.retain_desc,
            "model": main["model"], "n_neurons": main["n_neurons"], "baseline": main["baseline"], "runs": runs,
            "timings_s": main.get("timings_s", {}), "config": configs,
            "snip_variants": {label: over for label, over in variants},
            "not_run": missing}


def run_mask_modes(sc: Scenario, model: Any, work: Path, sizes: dict[str, int]) -> dict:
    """Mask modes compared on one scenario for the activation and attribution selections."""
    from snip_lens.sweep import DataConfig, SweepConfig

    base = work / sc.name
    main_cfg = json.loads((base / "baselines" / "config.json").read_text())
    data = DataConfig(**main_cfg["data"])
    main = json.loads((base / "baselines" / "results.json").read_text())
    keep = {round(float(k.rstrip("%")) / 100 * main["n_neurons"]) for k in MASK_MODE_KS}
    runs = [{**r, "mask_mode": "zero"} for r in main["runs"] if r["method"] in MASK_MODE_METHODS and r["k"] in keep]
    baseline = main["baseline"]
    for mode in MASK_MODES:
        if mode == main_cfg.get("mask_mode", "zero"):
            continue  # the main sweep measured this mode already
        d = base / f"mask-{mode.replace(':', '')}"
        _share(base / "baselines", d, ["records", "scores"])
        try:
            res = run_one(SweepConfig(data=data, methods=MASK_MODE_METHODS, ks=MASK_MODE_KS, mask_mode=mode,
                                      **BASELINE_RECORDS), d, model)
        except NotFinished:
            continue
        runs += [{**r, "mask_mode": mode} for r in res["runs"]]
        baseline = res["baseline"]
    return {"scenario": sc.name, "methods": MASK_MODE_METHODS, "modes": list(MASK_MODES), "baseline": baseline,
            "runs": runs, "n_neurons": main["n_neurons"]}


# ---- summary ---------------------------------------------------------------------------------------


def _drop(base: dict, run: dict, side: str, metric: str = "top1") -> float:
    return base[side][metric] - run[side][metric]


def _random_mean(sc: dict, k: int, side: str, metric: str = "top1") -> float:
    rs = [r for r in sc["runs"] if r["method"] == "random" and r["k"] == k]
    return sum(_drop(sc["baseline"], r, side, metric) for r in rs) / len(rs)


def method_rows(sc: dict) -> list[dict]:
    """One row per (method, k): metrics, drops, and the forget drop as a multiple of random's; random is
    the mean of its seeds."""
    base = sc["baseline"]
    rows = []
    methods = list(dict.fromkeys(r["method"] for r in sc["runs"]))
    for m in methods:
        for k in sorted({r["k"] for r in sc["runs"] if r["method"] == m}):
            rs = [r for r in sc["runs"] if r["method"] == m and r["k"] == k]
            avg = {side: {met: sum(r[side][met] for r in rs) / len(rs) for met in ("loss", "top1", "top10")}
                   for side in ("forget", "retain")}
            fd, rd = base["forget"]["top1"] - avg["forget"]["top1"], base["retain"]["top1"] - avg["retain"]["top1"]
            rnd = _random_mean(sc, k, "forget")
            rows.append({"method": m + (f" ({len(rs)} seeds)" if len(rs) > 1 else ""), "key": m, "k": k,
                         "k_percent": rs[0]["k_percent"], **{f"{s}_{met}": avg[s][met] for s in avg for met in avg[s]},
                         "forget_top1_drop": fd, "retain_top1_drop": rd, "selectivity": fd - rd,
                         "forget_drop_x_random": fd / rnd if rnd > 0 else float("nan")})
    return rows


def targets(sc: dict) -> dict:
    """The benchmark's targets on one scenario, per snip variant and for hybrid vs activation."""
    rows = method_rows(sc)
    by = {(r["key"], r["k"]): r for r in rows}
    ks = sorted({r["k"] for r in rows})
    big = [k for k in ks if abs(100.0 * k / sc["n_neurons"] - 2) < 0.01 or abs(100.0 * k / sc["n_neurons"] - 4) < 0.01]
    out: dict[str, Any] = {}
    for m in sorted({r["key"] for r in rows if r["key"].startswith("snip")} | {"hybrid", "attribution", "activation"}):
        checks = []
        for k in big:
            r = by.get((m, k))
            if r is None:
                continue
            checks.append({"k": k, "forget_drop_x_random": round(r["forget_drop_x_random"], 2),
                           "retain_over_forget_drop": round(r["retain_top1_drop"] / r["forget_top1_drop"], 3)
                           if r["forget_top1_drop"] > 0 else None,
                           "met": bool(r["forget_drop_x_random"] >= 3 and r["forget_top1_drop"] > 0
                                       and r["retain_top1_drop"] <= r["forget_top1_drop"] / 3)})
        if checks:
            out[m] = {"checks": checks, "met": all(c["met"] for c in checks)}
    hyb = [{"k": k, "hybrid": round(by[("hybrid", k)]["selectivity"], 4),
            "activation": round(by[("activation", k)]["selectivity"], 4),
            "met": by[("hybrid", k)]["selectivity"] >= by[("activation", k)]["selectivity"]}
           for k in ks if ("hybrid", k) in by and ("activation", k) in by]
    if hyb:
        out["hybrid_selectivity_ge_activation"] = {"checks": hyb, "met": all(c["met"] for c in hyb)}
    return out


def table(scenarios: list[dict]) -> str:
    head = ("| scenario | method | k | forget loss | forget top-1 | forget top-10 | retain loss | retain top-1 | "
            "retain top-10 | forget top-1 drop (x random) | retain top-1 drop | selectivity |")
    lines = [head, "|" + "---|" * 12]
    for sc in scenarios:
        b = sc["baseline"]
        lines.append(f"| {sc['name']} | none | 0 | {b['forget']['loss']:.3f} | {b['forget']['top1']:.3f} | "
                     f"{b['forget']['top10']:.3f} | {b['retain']['loss']:.3f} | {b['retain']['top1']:.3f} | "
                     f"{b['retain']['top10']:.3f} | | | |")
        for r in method_rows(sc):
            lines.append(
                f"| {sc['name']} | {r['method']} | {r['k_percent']:.2g}% | {r['forget_loss']:.3f} | "
                f"{r['forget_top1']:.3f} | {r['forget_top10']:.3f} | {r['retain_loss']:.3f} | {r['retain_top1']:.3f} | "
                f"{r['retain_top10']:.3f} | {r['forget_top1_drop']:+.3f} ({r['forget_drop_x_random']:.1f}x) | "
                f"{r['retain_top1_drop']:+.3f} | {r['selectivity']:+.3f} |")
    return "\n".join(lines)


def summary_table(scenarios: list[dict]) -> str:
    """Forget top-1 drop (as a multiple of random's) and retain top-1 drop of every method at 2% and 4%: the
    table the README shows."""
    lines = ["| scenario | method | 2%: forget drop (x random) | 2%: retain drop | 4%: forget drop (x random) | "
             "4%: retain drop |", "|---|---|---|---|---|---|"]
    for sc in scenarios:
        rows = method_rows(sc)
        for m in dict.fromkeys(r["method"] for r in rows):
            cells = []
            for pct in (2, 4):
                r = next((r for r in rows if r["method"] == m and abs(r["k_percent"] - pct) < 0.01), None)
                cells += ["", ""] if r is None else [f"{r['forget_top1_drop']:+.3f} ({r['forget_drop_x_random']:.1f}x)",
                                                     f"{r['retain_top1_drop']:+.3f}"]
            lines.append(f"| {sc['name']} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mask_mode_table(mm: dict) -> str:
    b = mm["baseline"]
    lines = ["| method | mask mode | k | forget top-1 drop | retain top-1 drop | forget loss rise | retain loss rise |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(mm["runs"], key=lambda r: (r["method"], r["k"], MASK_MODES.index(r["mask_mode"]))):
        lines.append(f"| {r['method']} | {r['mask_mode']} | {r['k_percent']:.2g}% | "
                     f"{b['forget']['top1'] - r['forget']['top1']:+.3f} | {b['retain']['top1'] - r['retain']['top1']:+.3f} | "
                     f"{r['forget']['loss'] - b['forget']['loss']:+.3f} | {r['retain']['loss'] - b['retain']['loss']:+.3f} |")
    return "\n".join(lines)


def plot(sc: dict, out: Path) -> list[str]:
    """The sweep's plots for one scenario, random shown as the mean of its seeds."""
    from snip_lens.report import plot_results

    runs = [r for r in sc["runs"] if r["method"] != "random"]
    for k in sorted({r["k"] for r in sc["runs"] if r["method"] == "random"}):
        rs = [r for r in sc["runs"] if r["method"] == "random" and r["k"] == k]
        runs.append({"method": "random (mean of seeds)", "k": k, "k_percent": rs[0]["k_percent"],
                     **{s: {m: sum(r[s][m] for r in rs) / len(rs) for m in ("loss", "top1", "top10")}
                        for s in ("forget", "retain")}, "extra": {}})
    view = {"model": f"{sc['model']} - {sc['name']}", "n_neurons": sc["n_neurons"], "baseline": sc["baseline"],
            "runs": runs}
    return [os.path.relpath(p, ROOT) for p in plot_results(view, out)]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default="a,b,c,d", help="comma-separated keys (a code, b German, c Italian, "
                                                          "d scripture)")
    p.add_argument("--work", default=str(ROOT / "out" / "unlearning"), help="intermediates (resumable)")
    p.add_argument("--results", default=str(RESULTS), help="where unlearning.json/.md and plots go")
    p.add_argument("--select-windows", type=int, default=16, help="selection windows per side (the demo: 32)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out evaluation windows per side (the demo: 16)")
    p.add_argument("--embedding-match", action="store_true",
                   help="also SNIP with the paper's embedding match on the default explanation kind")
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--no-mask-modes", action="store_true", help="skip the mask-mode comparison on scenario a")
    p.add_argument("--no-snip", action="store_true", help="only the non-interpretable methods (a first pass)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the results of the sweeps that finished (the rest listed as not run)")
    p.add_argument("--ran-at", default="", help="with --report-only: the commit the sweeps ran at (recorded)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline (numbers meaningless)")
    args = p.parse_args(argv)
    global REPORT_ONLY, EMBEDDING_MATCH
    REPORT_ONLY = args.report_only
    EMBEDDING_MATCH = args.embedding_match
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sizes = {"select_windows": args.select_windows, "eval_windows": args.eval_windows, "n_ctx": args.n_ctx}
    if args.quick:
        sizes = {"select_windows": 2, "eval_windows": 2, "n_ctx": 32}
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in keys if k not in {s.key for s in SCENARIOS}]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {[s.key for s in SCENARIOS]}")
    ensure_installed()

    from snip_lens.models import load_model

    work, results_dir = Path(args.work), Path(args.results)
    if args.quick:
        work = work.with_name(work.name + "-quick")
    t0 = time.perf_counter()
    model = None if args.report_only else load_model("smollm2-135m")
    out_json = results_dir / ("unlearning-quick.json" if args.quick else "unlearning.json")
    doc: dict[str, Any] = {
        "benchmark": "benchmarks/unlearning.py", "argv": sys.argv[1:], "sizes": sizes, "ks": KS,
        "random_seeds": list(RANDOM_SEEDS), "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "snip_variants": {label: over for label, over in snip_variants()}, "scenarios": [], "scenarios_not_run": [],
        "cpu_count": os.cpu_count(), "sweeps_git_commit": args.ran_at or _git("rev-parse", "HEAD"),
    }
    from snip_lens._io import atomic_write_json, atomic_write_text

    def portable(obj: Any) -> Any:
        # Paths under the work directory are written relative to it, so the results name no machine's layout.
        if isinstance(obj, str):
            return obj.replace(str(work) + os.sep, "<work>/")
        if isinstance(obj, dict):
            return {k: portable(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [portable(v) for v in obj]
        return obj

    for sc in [s for s in SCENARIOS if s.key in keys]:
        t = time.perf_counter()
        try:
            res = run_scenario(sc, model, work, sizes, snip=not args.no_snip)
        except NotFinished:
            doc["scenarios_not_run"].append(sc.name)
            continue
        res["wall_s"] = round(time.perf_counter() - t, 1)
        res["plots"] = plot(res, results_dir / "unlearning" / sc.name)
        res["targets"] = targets(res)
        doc["scenarios"].append(res)
        doc["load_average_1min"] = round(os.getloadavg()[0], 2)
        atomic_write_json(out_json, portable(doc))  # after every scenario, so a partial run still leaves its results
        print(table([res]), flush=True)
    if not args.no_mask_modes and "a" in keys and any(sc["key"] == "a" for sc in doc["scenarios"]):
        doc["mask_modes"] = run_mask_modes(SCENARIOS[0], model, work, sizes)
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    doc["load_average_1min"] = round(os.getloadavg()[0], 2)
    atomic_write_json(out_json, portable(doc))
    md = ["# Unlearning benchmark (SmolLM2-135M)", "",
          f"Written by `python benchmarks/unlearning.py {' '.join(sys.argv[1:])}`; sweeps run at commit "
          f"{doc['sweeps_git_commit'][:10]}; {sizes['select_windows']} selection and "
          f"{sizes['eval_windows']} held-out windows of {sizes['n_ctx']} tokens per side; top-1 drops are baseline "
          "minus pruned; `x random` is the forget drop over random's (mean of seeds) at the same k; selectivity "
          "is forget drop minus retain drop.", "", "## Summary at 2% and 4%", "", summary_table(doc["scenarios"]), "",
          "## Every method and k", "", table(doc["scenarios"]), ""]
    md += ["## Targets", ""]
    for sc in doc["scenarios"]:
        if sc.get("not_run"):
            md.append(f"- {sc['name']}: not run in time: {', '.join(sc['not_run'])}")
        for m, t in sc["targets"].items():
            md.append(f"- {sc['name']} / {m}: {'met' if t['met'] else 'missed'} - {json.dumps(t['checks'])}")
    if "mask_modes" in doc:
        md += ["", f"## Mask modes ({doc['mask_modes']['scenario']})", "", mask_mode_table(doc["mask_modes"])]
    if doc.get("scenarios_not_run"):
        md.append(f"- scenarios not run in time: {', '.join(doc['scenarios_not_run'])}")
    text = "\n".join(md) + "\n"
    atomic_write_text(out_json.with_suffix(".md"), text)
    print(text)
    print(f"wrote {out_json} in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
