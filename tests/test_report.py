"""Plots and reports show every method and every run, and what each method pruned."""

from __future__ import annotations

import struct

from snip_lens.report import MethodDetail, PrunedNeuron, plot_results, results_table, write_report


def _results():
    base = {"forget": {"loss": 2.0, "top1": 0.5, "top10": 0.8}, "retain": {"loss": 2.5, "top1": 0.4, "top10": 0.7},
            "extra": {"cbt_P_accuracy": 0.6}}
    runs = []
    for method, drop in (("snip", 0.2), ("random", 0.01)):
        for k in (10, 20):
            runs.append({"method": method, "k": k,
                         "forget": {"loss": 2.0 + drop * k, "top1": 0.5 - drop * k / 100, "top10": 0.8},
                         "retain": {"loss": 2.5, "top1": 0.4, "top10": 0.7},
                         "extra": {"cbt_P_accuracy": 0.6 - drop * k / 100}})
    return {"model": "tiny", "n_neurons": 200, "baseline": base, "runs": runs}


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plots_one_png_per_metric(tmp_path):
    paths = plot_results(_results(), tmp_path)
    assert sorted(p.name for p in paths) == ["cbt_P_accuracy.png", "loss.png", "top1.png", "top10.png"]
    for p in paths:
        w, h = _png_size(p)
        assert w > 300 and h > 200


def test_table_and_reports_list_runs_and_pruned_neurons(tmp_path):
    res = _results()
    rows = results_table(res)
    assert rows[1][0] == "(none)" and len(rows) == 1 + 1 + 4
    assert ["snip", "20", "10.00", "0.460", "0.400", "6.000", "2.500"] in rows
    details = [MethodDetail("snip", 20, [PrunedNeuron("L1/N3", 0.91, "the Python keyword 'def' <b>", "def keyword")],
                            {1: 20})]
    md, html = write_report(res, details, tmp_path, plots=plot_results(res, tmp_path / "plots"),
                            concepts=["Python keywords"])
    text = md.read_text()
    assert "L1/N3" in text and "def keyword" in text and "Python keywords" in text and "plots/top1.png" in text
    page = html.read_text()
    assert "&lt;b&gt;" in page and "<b>" not in page.split("<body>")[1].split("</h1>")[1]  # escaped
    assert "L1: 20" in page


def test_a_method_keeps_its_colour_in_every_plot_and_run(tmp_path, monkeypatch):
    import matplotlib.axes

    from snip_lens.report import METHOD_COLORS, method_color

    seen: list[tuple[str, str]] = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        seen.append((kw.get("label"), kw.get("color")))
        return real(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    res = _results()
    plot_results(res, tmp_path / "a")
    only_random = dict(res, runs=[r for r in res["runs"] if r["method"] == "random"])  # another run's order
    plot_results(only_random, tmp_path / "b")
    assert {label for label, _ in seen} == {"snip", "random"}
    for label, color in seen:
        assert color == METHOD_COLORS[label]
    assert method_color("new-method") == method_color("new-method") and len(set(METHOD_COLORS.values())) == 8


def test_identical_rows_are_grouped_with_a_count_and_random_is_not_ranked(tmp_path):
    res = _results()
    same = [PrunedNeuron(f"L0/N{i}", 1.0, "numbers in tables", "numbers") for i in range(40)]
    details = [MethodDetail("snip", 40, same + [PrunedNeuron("L1/N1", 0.5, "dates", "time")], {0: 40, 1: 1}),
               MethodDetail("random", 40, [PrunedNeuron("L1/N2", 0.1, "", "")], {1: 1})]
    md, html = write_report(res, details, tmp_path)
    text = md.read_text()
    snip_part = text.split("## snip")[1].split("## ")[0]
    rows = [line for line in snip_part.splitlines() if line.startswith("| L")]
    assert len(rows) == 2 and "40 neurons: L0/N0, L0/N1" in rows[0] and "and 34 more" in rows[0]
    assert "Variety: 41 neurons listed, 2 distinct explanations, 2 distinct concepts." in snip_part
    assert "L0: 40, L1: 1" in snip_part
    random_head = text.split("## random")[1].splitlines()[0]
    assert "highest-ranked" not in random_head and "random" in random_head
    assert "highest-ranked" in text.split("## snip")[1].splitlines()[0]
    assert "40 neurons: L0/N0" in html.read_text()
