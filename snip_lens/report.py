"""Plots and reports of an unlearning sweep: what each method removed and what it cost.

``plot_results`` draws one PNG per metric (metric vs k, one line per method, like the paper's Figure 2);
``write_report`` writes ``report.md`` and ``report.html`` with the results table and, for each method, the
pruned neurons with their explanations and each method's own evidence for pruning them (SNIP: the matched
concept and its cosine; activation: the forget/retain ratio; random: nothing, it had none).
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRIC_LABELS = {
    "top1": "top-1 next-token accuracy",
    "top10": "top-10 next-token accuracy",
    "loss": "next-token loss (nats)",
}


METHOD_COLORS = {
    "snip": "#1f77b4", "hybrid": "#ff7f0e", "activation": "#2ca02c", "activation-freq": "#bcbd22",
    "random": "#7f7f7f", "keyword": "#9467bd", "llm-judge": "#d62728", "attribution": "#8c564b",
}
"""One colour per method in every plot of every run (matplotlib's tab10 values)."""

_SPARE_COLORS = ("#e377c2", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")

UNRANKED_METHODS = ("random",)
"""Methods whose order is a random draw, not a ranking: their report section is not headed "highest-ranked"."""


def method_color(method: str) -> str:
    """The colour of ``method``: fixed for known methods, else a stable pick from spare colours by name."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    import hashlib

    return _SPARE_COLORS[int(hashlib.sha256(method.encode()).hexdigest(), 16) % len(_SPARE_COLORS)]


@dataclass
class PrunedNeuron:
    """One pruned neuron as the report shows it."""

    neuron: str
    """``L{layer}/N{index}``."""
    score: float
    """The method's score for it."""
    explanation: str
    """Its explanation in words ('' when none)."""
    concept: str = ""
    """The forget-set concept it matched (SNIP, hybrid), or the keyword (keyword method)."""
    evidence: dict[str, str] = field(default_factory=dict)
    """The method's own evidence, column name -> formatted value (see ``neuron_evidence``); empty: the
    report shows ``score`` and ``concept``."""


@dataclass
class MethodDetail:
    """What one method pruned at the largest k of the sweep."""

    method: str
    k: int
    neurons: list[PrunedNeuron] = field(default_factory=list)
    layer_histogram: dict[int, int] = field(default_factory=dict)
    """How many of its pruned neurons sit in each layer."""


def neuron_evidence(method: str, neuron: Any, scores: dict[str, Any]) -> dict[str, str]:
    """Why ``method`` pruned ``neuron``, from that method's own scores only (``scores``: method -> NeuronScores).

    snip: the matched concept and its cosine; hybrid: its score, the activation ratio, the cosine and concept;
    activation(-freq): the forget/retain ratio; keyword: the keyword and the explanation score; llm-judge:
    the rating; random: nothing (a random draw has no evidence). Another method's concept is never shown.
    """
    def val(name: str) -> float | None:
        sc = scores.get(name)
        if sc is None:
            return None
        v = float(sc.scores[neuron.layer, neuron.index])
        return v if v == v and abs(v) != float("inf") else None

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    def concept(name: str) -> str:
        sc = scores.get(name)
        return sc.labels.get(neuron, "") if sc is not None else ""

    snip = scores.get("snip")
    evidence = snip is not None and snip.score_name.startswith("evidence")
    # what SNIP's score is (the paper's cosine, or the evidence match) and what gave it
    what, why = ("evidence score", "weightiest evidence") if evidence else ("cosine", "matched concept")
    if method == "snip":
        return {what: fmt(val("snip")), why: concept("snip")}
    if method == "hybrid":
        return {"hybrid score": fmt(val("hybrid")), "activation ratio": fmt(val("activation")),
                what: fmt(val("snip")), why: concept("snip")}
    if method in ("activation", "activation-freq"):
        return {"forget/retain ratio": fmt(val(method))}
    if method == "keyword":
        sc = scores.get("keyword")
        q = None
        if sc is not None and sc.secondary is not None:
            q = float(sc.secondary[neuron.layer, neuron.index])
            q = q if abs(q) != float("inf") else None
        return {"keyword": concept("keyword"), "explanation score": fmt(q)}
    if method == "llm-judge":
        return {"judge rating": fmt(val("llm-judge"))}
    return {}


def _columns(d: "MethodDetail") -> list[str]:
    """The evidence columns of one method's table (from its first neuron; none for random)."""
    if d.neurons and (d.neurons[0].evidence or d.method == "random"):
        return list(d.neurons[0].evidence)
    return ["score", "matched concept"]


def _cells(n: PrunedNeuron, columns: list[str]) -> list[str]:
    if n.evidence or columns != ["score", "matched concept"]:
        return [n.evidence.get(c, "") for c in columns]
    return [f"{n.score:.3f}", n.concept]


def _series(results: dict, method: str, side: str, metric: str) -> tuple[list[float], list[float]]:
    base = results["baseline"][side].get(metric)
    xs, ys = [0.0], [base]
    runs = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["k"])
    for r in runs:
        if metric in r.get(side, {}):
            xs.append(100.0 * r["k"] / results["n_neurons"])
            ys.append(r[side][metric])
    return xs, ys


def plot_results(results: dict, out_dir: str | Path) -> list[Path]:
    """One PNG per metric: forget and retain panels, metric vs % of neurons pruned, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    written = []
    metrics = [m for m in ("top1", "top10", "loss") if m in results["baseline"]["forget"]]
    extra_metrics = sorted({key for r in results["runs"] for key, v in r.get("extra", {}).items()
                            if isinstance(v, (int, float))})
    for metric in metrics:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=metric != "loss")
        for ax, side in zip(axes, ("forget", "retain")):
            for m in methods:
                xs, ys = _series(results, m, side, metric)
                ax.plot(xs, ys, marker="o", label=m, color=method_color(m))
            ax.set_title(f"{side} set")
            ax.set_xlabel("% of MLP neurons pruned")
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"{results['model']}: {METRIC_LABELS.get(metric, metric)}")
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for metric in extra_metrics:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for m in methods:
            runs = sorted((r for r in results["runs"] if r["method"] == m and metric in r.get("extra", {})),
                          key=lambda r: r["k"])
            base = results.get("baseline", {}).get("extra", {}).get(metric)
            xs = ([0.0] if base is not None else []) + [100.0 * r["k"] / results["n_neurons"] for r in runs]
            ys = ([base] if base is not None else []) + [r["extra"][metric] for r in runs]
            ax.plot(xs, ys, marker="o", label=m, color=method_color(m))
        ax.set_xlabel("% of MLP neurons pruned")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def results_table(results: dict) -> list[list[str]]:
    """Rows of (method, k, % pruned, forget top-1, retain top-1, forget loss, retain loss) as strings."""
    rows = [["method", "k", "% pruned", "forget top-1", "retain top-1", "forget loss", "retain loss"]]
    b = results["baseline"]
    rows.append(["(none)", "0", "0.00", f"{b['forget']['top1']:.3f}", f"{b['retain']['top1']:.3f}",
                 f"{b['forget']['loss']:.3f}", f"{b['retain']['loss']:.3f}"])
    for r in sorted(results["runs"], key=lambda r: (r["k"], r["method"])):
        rows.append([r["method"], str(r["k"]), f"{100 * r['k'] / results['n_neurons']:.2f}",
                     f"{r['forget']['top1']:.3f}", f"{r['retain']['top1']:.3f}",
                     f"{r['forget']['loss']:.3f}", f"{r['retain']['loss']:.3f}"])
    return rows


def format_table(rows: list[list[str]]) -> str:
    """A plain fixed-width table for the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def group_identical(neurons: list[PrunedNeuron]) -> list[tuple[PrunedNeuron, list[str]]]:
    """Rows with the same score, explanation and concept merged: (first row, all neuron names), in order of
    first appearance (so a ranking stays a ranking)."""
    groups: dict[tuple, tuple[PrunedNeuron, list[str]]] = {}
    for n in neurons:
        key = (round(n.score, 3), n.explanation, n.concept, tuple(sorted(n.evidence.items())))
        if key in groups:
            groups[key][1].append(n.neuron)
        else:
            groups[key] = (n, [n.neuron])
    return list(groups.values())


def section_heading(d: MethodDetail, shown: int) -> str:
    """The title of a method's section: what the rows are (a ranking's top, or a random draw)."""
    if d.method in UNRANKED_METHODS:
        return f"{d.method}: {shown} of its {d.k} pruned neurons (drawn at random, not ranked)"
    return f"{d.method}: the {shown} highest-ranked of {d.k} pruned neurons"


def variety_line(d: MethodDetail) -> str:
    """How varied a method's pruned neurons are: distinct explanations and concepts among the listed ones."""
    expl = {n.explanation for n in d.neurons if n.explanation}
    conc = {n.concept for n in d.neurons if n.concept}
    parts = [f"{len(d.neurons)} neurons listed", f"{len(expl)} distinct explanations"]
    if conc:
        parts.append(f"{len(conc)} distinct concepts")
    return "Variety: " + ", ".join(parts) + "."


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(results: dict, details: list[MethodDetail], out_dir: str | Path, *,
                 plots: list[Path] | None = None, concepts: list[str] | None = None,
                 max_neurons: int = 40, sections: list[tuple[str, str]] | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return their paths.

    ``sections``: (markdown, html) pairs of further evaluations, placed after the plots.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = plots or []
    rows = results_table(results)
    md = [f"# Unlearning report: {results['model']}", "",
          f"{results['n_neurons']} MLP neurons. Metrics on held-out forget and retain windows never used for "
          "selection. Lower forget accuracy with unchanged retain accuracy is the goal.", ""]
    md += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md.append("")
    for p in plots:
        md += [f"![{p.stem}]({p.relative_to(out) if p.is_relative_to(out) else p})", ""]
    for sec_md, _ in sections or []:
        md += [sec_md, ""]
    if concepts:
        md += ["## Forget-set concepts", ""] + [f"{i + 1}. {_md_escape(c)}" for i, c in enumerate(concepts)] + [""]
    for d in details:
        groups = group_identical(d.neurons)[:max_neurons]
        md += [f"## {section_heading(d, sum(len(names) for _, names in groups))}", ""]
        if d.layer_histogram:
            md += ["Pruned neurons per layer: " + ", ".join(f"L{l}: {n}" for l, n in sorted(d.layer_histogram.items())),
                   ""]
        md += [variety_line(d), ""]
        cols = _columns(d)
        if d.method == "random":
            md += ["A random draw: there is no evidence to show for these neurons.", ""]
        md += ["| " + " | ".join(["neuron", *cols, "explanation", "same row"]) + " |", "|" + "---|" * (len(cols) + 3)]
        for n, names in groups:
            same = f"{len(names)} neurons: {_names(names)}" if len(names) > 1 else ""
            cells = [n.neuron, *(_md_escape(c) for c in _cells(n, cols)), _md_escape(n.explanation), same]
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")

    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>Unlearning report: {e(results['model'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:14px;text-align:left}th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
             f"<h1>Unlearning report: {e(results['model'])}</h1>",
             f"<p>{results['n_neurons']} MLP neurons. Metrics on held-out forget and retain windows never used "
             "for selection.</p><table>"]
    parts.append("<tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>")
    for r in rows[1:]:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    parts.append("</table>")
    for p in plots:
        src = p.relative_to(out) if p.is_relative_to(out) else p
        parts.append(f"<h3>{e(p.stem)}</h3><img src='{e(str(src))}' alt='{e(p.stem)}'>")
    for _, sec_html in sections or []:
        parts.append(sec_html)
    if concepts:
        parts.append("<h2>Forget-set concepts</h2><ol>" + "".join(f"<li>{e(c)}</li>" for c in concepts) + "</ol>")
    for d in details:
        groups = group_identical(d.neurons)[:max_neurons]
        heading = section_heading(d, sum(len(names) for _, names in groups))
        parts.append(f"<h2 style='color:{method_color(d.method)}'>{e(heading)}</h2>")
        if d.layer_histogram:
            parts.append("<p>Pruned neurons per layer: " + e(", ".join(
                f"L{l}: {n}" for l, n in sorted(d.layer_histogram.items()))) + "</p>")
        parts.append(f"<p>{e(variety_line(d))}</p>")
        cols = _columns(d)
        if d.method == "random":
            parts.append("<p>A random draw: there is no evidence to show for these neurons.</p>")
        parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in ["neuron", *cols, "explanation", "same row"])
                     + "</tr>")
        for n, names in groups:
            same = f"{len(names)} neurons: {_names(names)}" if len(names) > 1 else ""
            cells = [n.neuron, *_cells(n, cols), n.explanation, same]
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    return md_path, html_path
