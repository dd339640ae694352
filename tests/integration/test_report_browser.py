"""The report opens in headless Chromium offline: no console errors, every plot drawn.

Checked at 1024 and 1600 px wide: the headline table needs no horizontal
scroll, no figure sits alone in a half-empty row, log axes label decades.
Each width leaves a full-page screenshot, ``report-<width>.png``, in the
test's temporary folder (``pytest --basetemp DIR`` keeps them in DIR).

Needs Debian's chromium (``make test`` installs it) and playwright (the dev
extra); playwright drives the system browser, so no browser is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.report import write_report
from sim.scenario import parse_scenario
from sim.sweep import LocalExecutor, run_sweep
from traces.loaders import save
from traces.trace import Trace

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PLOTS = ("ttft-cdf", "p90-ttft", "slo-attainment", "goodput", "short-long", "timeline", "batches")


def _graph_run(path: Path) -> Path:
    """A run whose policy replayed prefills as CUDA graphs (as LAPS's graph buckets do)."""
    path.mkdir(parents=True)
    n = 30
    arrival = np.arange(n) * 0.1
    pd.DataFrame(
        {
            "arrival_s": arrival,
            "first_token_s": arrival + 0.05 + 0.01 * (np.arange(n) % 4),
            "finish_s": arrival + 0.8,
            "prompt_tokens": [64 + 40 * (i % 10) for i in range(n)],
            "output_tokens": [20] * n,
        }
    ).to_parquet(path / "results.parquet")
    pd.DataFrame(
        {
            "n_prefill": [1, 2, 4, 4, 8, 3],
            "shape_tokens": [256, 512, 1024, 1024, 2048, 1024],
            "padding_tokens": [0, 40, 100, 0, 300, 250],
            "cuda_graph": [True] * 6,
        }
    ).to_parquet(path / "batches.parquet")
    return path


def _add_bands(sweep: Path) -> None:
    """Bands on every headline figure, as runs with step costs scaled ×0.8 and ×1.3 would give.

    Wide ones, with five-digit ends, so the headline must still fit 1024 px with them.
    """
    for path in sweep.glob("points/*/summary.json"):
        summary = json.loads(path.read_text())
        for key in [k for k in summary if k.startswith(("ttft_", "tpot_", "e2e_"))]:
            if isinstance(summary[key], float):
                value = summary[key] * 400  # seconds become hundreds of seconds
                summary[key] = value
                summary |= {f"{key}_lo": value * 0.8, f"{key}_hi": value * 1.3}
        for key in ("slo_attainment", "goodput_rps", "throughput_rps"):
            summary |= {f"{key}_lo": summary[key] * 1.05, f"{key}_hi": summary[key] * 0.9}
        summary |= {"band_cost_scale_lo": 0.8, "band_cost_scale_hi": 1.3}
        path.write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    n = 120
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * 0.15,
            "prompt_tokens": [50 + 211 * (i % 9) for i in range(n)],
            "output_tokens": [10 + (i % 13) for i in range(n)],
        }
    )
    save(Trace(frame, name="t"), tmp / "t.parquet")
    scenario = parse_scenario(
        {
            "name": "browser check",
            "loads": [1.0, 2.0],
            "trace": {"path": str(tmp / "t.parquet")},
            "cluster": {"model": "llama-3.1-8b", "gpu": "h100", "instances": 2},
            "slo": {"ttft_ms": 100, "tpot_ms": 30},
            "policies": [{"name": "round_robin"}, {"name": "least_load"}],
        }
    )
    run_sweep(scenario, tmp / "sweep", LocalExecutor(1))
    _add_bands(tmp / "sweep")
    graphs = _graph_run(tmp / "graphs")
    return write_report([tmp / "sweep", graphs], tmp / "report").html


#: What the page looks like in the browser: sizes of the headline and the figures,
#: and the tick labels of the log axes.
_MEASURE = """() => {
    const box = e => e.getBoundingClientRect();
    const scroll = document.querySelector('#headline-table').parentElement;
    const figures = [...document.querySelectorAll('#plots figure')].map(f => ({
        id: f.querySelector('.plotly-graph-div').id, top: Math.round(box(f).top),
        left: Math.round(box(f).left), width: Math.round(box(f).width)}));
    const ticks = id => [...document.querySelectorAll(`#${id} .${id === 'plot-ttft-cdf'
        ? 'xtick' : 'ytick'} text`)].map(t => t.textContent);
    return {
        table: {scroll: scroll.scrollWidth, client: scroll.clientWidth},
        page: {scroll: document.documentElement.scrollWidth, client: window.innerWidth},
        takeaway: document.querySelector('#takeaway').textContent,
        figures: figures,
        ticks: {cdf: ticks('plot-ttft-cdf'), p90: ticks('plot-p90-ttft'),
                split: ticks('plot-short-long')},
        legend: box(document.querySelector('#plot-ttft-cdf g.legend')).toJSON(),
        buttons: [...document.querySelectorAll('#plot-ttft-cdf g.updatemenu-button')]
            .map(b => box(b).toJSON()),
    };
}"""


@pytest.mark.parametrize("width", [1024, 1600])
def test_the_report_renders_every_plot_without_console_errors(report, tmp_path, width):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    assert shutil.which("chromium") or Path(CHROMIUM).exists(), (
        "Debian's chromium is needed (make test installs it: apt-get install chromium)"
    )
    problems: list[str] = []
    shot = tmp_path / f"report-{width}.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            # Anything but the file itself would be a fetch from the network.
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else (
                problems.append(f"fetch {r.request.url}"), r.abort()))  # fmt: skip
            page.goto(report.as_uri(), wait_until="load")
            page.wait_for_function(
                "n => document.querySelectorAll('.plot .main-svg').length >= n", arg=len(PLOTS)
            )
            drawn = page.evaluate(
                """() => [...document.querySelectorAll('.plot .plotly-graph-div')].map(div => {
                    const svg = div.querySelector('.main-svg').getBoundingClientRect();
                    const marks = div.querySelectorAll(
                        '.scatterlayer .trace path.js-line, .barlayer .point path').length;
                    return {id: div.id, width: svg.width, height: svg.height,
                            traces: div.data.length, marks: marks};
                })"""
            )
            seen = page.evaluate(_MEASURE)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert [d["id"] for d in drawn] == [f"plot-{p}" for p in PLOTS]
    for d in drawn:
        assert d["width"] > 300 and d["height"] > 200, d
        assert d["traces"] > 0 and d["marks"] > 0, d
    assert shot.stat().st_size > 50_000
    # The headline reads without scrolling sideways, and so does the page.
    assert seen["table"]["scroll"] <= seen["table"]["client"], seen["table"]
    assert seen["page"]["scroll"] <= seen["page"]["client"], seen["page"]
    assert seen["takeaway"].startswith("On SLO attainment, "), seen["takeaway"]
    # Every figure shares its row with another, or has the row to itself.
    rows: dict[int, list[dict]] = {}
    for f in seen["figures"]:
        rows.setdefault(f["top"], []).append(f)
    full = max(f["width"] for f in seen["figures"])
    for row in rows.values():
        assert len(row) == 2 or row[0]["width"] == full, (width, row)
    if width == 1600:  # two columns: p90 TTFT beside SLO attainment, goodput beside the split
        assert [len(r) for r in rows.values()] == [1, 2, 2, 1, 1], rows
    else:
        assert all(len(r) == 1 for r in rows.values()), rows
    # The CDF's load buttons hide no legend entry.
    legend = seen["legend"]
    assert seen["buttons"], "the CDF has a button per load"
    for b in seen["buttons"]:
        apart = b["bottom"] <= legend["top"] or b["top"] >= legend["bottom"]
        assert apart or b["right"] <= legend["left"] or b["left"] >= legend["right"], (b, legend)
    # Log axes label decades (and 2s and 5s over a short span), in ms or s.
    for axis, labels in seen["ticks"].items():
        assert labels, axis
        for label in labels:
            number, unit = label.replace(",", "").split(" ")
            assert unit in ("ms", "s") and number.lstrip("0.")[0] in "125", (axis, labels)
            assert set(number.lstrip("0.")[1:]) <= {"0"}, (axis, labels)
