"""Draw the Grafana dashboard into a PNG, from the dashboard's own queries against a real Prometheus.

Grafana is what a deployment looks at; this script draws the same panels where no Grafana
runs (CI, a laptop, the README's picture): it reads ``deploy/grafana/dashboards/dmft.json``,
runs every panel's PromQL as a range query (Grafana's ``$__rate_interval`` computed the way
Grafana computes it) and lays the panels out on the dashboard's 24-column grid with the
titles, legends, units and stacking of the JSON.

    python -m tools.render_dashboard --prometheus http://127.0.0.1:9090 --minutes 30 --out dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from matplotlib import dates as mdates
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "dmft.json"
GRID_COLUMNS = 24
WIDTH_IN = 20.0
ROW_HEIGHT_IN = WIDTH_IN / GRID_COLUMNS * 0.4  # a Grafana grid row is 30 px against a column of about 75 px
HEADER_IN = 0.55
TITLE_IN = 0.3  # a panel's title strip
LEGEND_ROW_IN = 0.19
AXIS_MARGIN_IN = (0.12, 0.3)  # right of the axes, below them (time labels); the left one fits the tick labels
FONT_PT = 8.5
CHAR_IN = FONT_PT / 72 * 0.6  # the width of a character of tick or legend text, roughly
# Grafana's dark theme and its classic palette, so the picture reads like the dashboard.
BACKGROUND, PANEL, GRID, TEXT, MUTED = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e"
PALETTE = (
    "#73BF69",
    "#F2CC0C",
    "#8AB8FF",
    "#FF780A",
    "#F2495C",
    "#5794F2",
    "#B877D9",
    "#FADE2A",
    "#37872D",
    "#C4162A",
    "#1F60C4",
    "#8F3BB8",
)
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_]\w*)\s*\}\}")
_RATE_INTERVAL = re.compile(r"\$(?:__rate_interval\b|\{__rate_interval\})")


@dataclass(frozen=True)
class Target:
    expr: str
    legend_format: str


@dataclass(frozen=True)
class Panel:
    title: str
    type: str  # "timeseries" or "row"
    x: int
    y: int
    w: int
    h: int
    unit: str = "short"
    stacked: bool = False
    targets: tuple[Target, ...] = ()


@dataclass(frozen=True)
class Series:
    name: str
    times: np.ndarray  # unix seconds
    values: np.ndarray  # NaN where Prometheus answered NaN (a quantile with no requests)


def load_panels(path: Path = DASHBOARD) -> list[Panel]:
    """The dashboard's panels (rows included), top to bottom, left to right."""
    panels = []
    for raw in json.loads(path.read_text())["panels"]:
        grid = raw["gridPos"]
        defaults = raw.get("fieldConfig", {}).get("defaults", {})
        panels.append(
            Panel(
                title=raw["title"],
                type=raw["type"],
                x=grid["x"],
                y=grid["y"],
                w=grid["w"],
                h=grid["h"],
                unit=defaults.get("unit", "short"),
                stacked=defaults.get("custom", {}).get("stacking", {}).get("mode", "none") != "none",
                targets=tuple(Target(t["expr"], t.get("legendFormat", "")) for t in raw.get("targets", [])),
            )
        )
    return sorted(panels, key=lambda panel: (panel.y, panel.x))


def rate_interval(step_s: float, scrape_interval_s: float) -> str:
    """Grafana's ``$__rate_interval``: four scrapes, or one step plus one scrape when steps are longer."""
    return f"{math.ceil(max(4 * scrape_interval_s, step_s + scrape_interval_s))}s"


def promql(expr: str, *, interval: str) -> str:
    """A panel's expression as Prometheus takes it: Grafana's ``$__rate_interval`` replaced by ``interval``."""
    query = _RATE_INTERVAL.sub(interval, expr)
    if "$" in query:
        raise ValueError(f"a Grafana variable this renderer does not know: {expr}")
    return query


def legend(legend_format: str, labels: dict[str, str]) -> str:
    """Grafana's legend: ``{{label}}`` replaced by the series' label values; no format shows the labels."""
    if legend_format:
        return _LEGEND_LABEL.sub(lambda match: labels.get(match.group(1), ""), legend_format)
    return "{" + ", ".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"


def query_range(client: httpx.Client, query: str, *, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
    """The matrix of ``/api/v1/query_range``; a query Prometheus refuses raises with its reason."""
    response = client.get("/api/v1/query_range", params={"query": query, "start": start, "end": end, "step": step_s})
    body = response.json()
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {query!r}: {body.get('error', response.text)}")
    return body["data"]["result"]


def panel_series(
    client: httpx.Client, panel: Panel, *, start: float, end: float, step_s: float, interval: str
) -> list[Series]:
    series = []
    for target in panel.targets:
        for result in query_range(client, promql(target.expr, interval=interval), start=start, end=end, step_s=step_s):
            points = np.array([(float(t), float(v)) for t, v in result["values"]], dtype=np.float64).reshape(-1, 2)
            series.append(Series(legend(target.legend_format, result["metric"]), points[:, 0], points[:, 1]))
    return series


def _compact(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _seconds(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value * 1e6:.3g} µs"
    if abs(value) < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


def unit_formatter(unit: str) -> Callable[[float, int], str]:
    """Tick labels in the panel's Grafana unit."""
    if unit == "s":
        return lambda value, _: _seconds(value)
    if unit == "percentunit":
        return lambda value, _: f"{value * 100:.3g}%"
    if unit == "reqps":
        return lambda value, _: f"{_compact(value)} req/s"
    if unit.startswith("suffix:"):
        suffix = unit.removeprefix("suffix:")
        return lambda value, _: f"{_compact(value)}{suffix}"
    return lambda value, _: _compact(value)


def _legend_columns(names: Sequence[str], width_in: float) -> int:
    """As many legend columns as the longest name lets fit across the panel."""
    longest = max(len(name) for name in names) * CHAR_IN + 0.4
    return max(1, min(len(names), int(width_in // longest)))


class DashboardFigure:
    """One matplotlib figure laid out like the dashboard: grid units to inches to figure fractions."""

    def __init__(self, panels: Sequence[Panel]) -> None:
        self.rows = max(panel.y + panel.h for panel in panels)
        self.height_in = HEADER_IN + self.rows * ROW_HEIGHT_IN
        self.figure = Figure(figsize=(WIDTH_IN, self.height_in), facecolor=BACKGROUND)

    def box(self, left_in: float, top_in: float, width_in: float, height_in: float) -> tuple[float, ...]:
        """A rectangle in inches from the figure's top left, as matplotlib's (left, bottom, width, height)."""
        return (
            left_in / WIDTH_IN,
            1 - (top_in + height_in) / self.height_in,
            width_in / WIDTH_IN,
            height_in / self.height_in,
        )

    def header(self, title: str, subtitle: str) -> None:
        self.figure.text(0.006, 1 - 0.22 / self.height_in, title, color=TEXT, fontsize=14, weight="bold", va="center")
        self.figure.text(0.994, 1 - 0.22 / self.height_in, subtitle, color=MUTED, fontsize=9, ha="right", va="center")

    def row(self, panel: Panel) -> None:
        top = HEADER_IN + panel.y * ROW_HEIGHT_IN
        self.figure.text(
            0.006, 1 - (top + ROW_HEIGHT_IN / 2) / self.height_in, panel.title, color=TEXT, fontsize=11, weight="bold"
        )

    def panel(self, panel: Panel, series: Sequence[Series], *, start: float, end: float) -> None:
        gap = 0.05
        left = panel.x * WIDTH_IN / GRID_COLUMNS + gap
        top = HEADER_IN + panel.y * ROW_HEIGHT_IN + gap
        width = panel.w * WIDTH_IN / GRID_COLUMNS - 2 * gap
        height = panel.h * ROW_HEIGHT_IN - 2 * gap
        frame = self.figure.add_axes(self.box(left, top, width, height))
        frame.set_facecolor(PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(GRID)
        title_at = (0.1 / width, 1 - TITLE_IN / 2 / height)
        frame.text(
            *title_at, panel.title, transform=frame.transAxes, color=TEXT, fontsize=9.5, weight="bold", va="center"
        )
        names = [s.name for s in series]
        columns = _legend_columns(names, width - 0.2) if names else 1
        legend_in = math.ceil(len(names) / columns) * LEGEND_ROW_IN + 0.05 if names else 0.0
        margin_right, margin_below = AXIS_MARGIN_IN
        plot_height = height - TITLE_IN - legend_in - margin_below
        axes = self.figure.add_axes(self.box(left, top + TITLE_IN, width - margin_right, plot_height))
        colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
        if series:
            _plot(axes, series, colors, stacked=panel.stacked)
        else:
            axes.text(0.5, 0.5, "No data", transform=axes.transAxes, color=MUTED, fontsize=11, ha="center")
        _style_axes(axes, panel.unit, start=start, end=end, width_in=width)
        # Now that the ticks are known, leave room on the left for the widest of their labels.
        formatter = unit_formatter(panel.unit)
        labels = [formatter(tick, 0) for tick in axes.get_yticks() if tick <= axes.get_ylim()[1]]
        margin_left = 0.2 + CHAR_IN * max(map(len, labels), default=1)
        axes.set_position(self.box(left + margin_left, top + TITLE_IN, width - margin_left - margin_right, plot_height))
        if names:
            handles = [Line2D([], [], color=color, linewidth=3) for color in colors]
            anchor = self.box(left + 0.08, top + height - legend_in, 0, 0)[:2]
            self.figure.legend(
                handles,
                names,
                loc="upper left",
                bbox_to_anchor=anchor,
                ncol=columns,
                frameon=False,
                fontsize=FONT_PT,
                labelcolor=TEXT,
                handlelength=1.0,
                columnspacing=1.2,
                borderaxespad=0,
                borderpad=0.1,
            )

    def save(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(out, dpi=100, facecolor=BACKGROUND)


def _plot(axes: Axes, series: Sequence[Series], colors: Sequence[str], *, stacked: bool) -> None:
    if stacked:
        # Stacks need one time axis: Prometheus answers on the step grid, a series may miss steps.
        times = np.unique(np.concatenate([s.times for s in series]))
        stack = np.zeros((len(series), len(times)))
        for row, s in zip(stack, series, strict=True):
            row[np.searchsorted(times, s.times)] = np.nan_to_num(s.values)
        when = [datetime.fromtimestamp(t, UTC) for t in times]
        axes.stackplot(when, stack, colors=colors, alpha=0.35, linewidth=0)
        for color, top in zip(colors, np.cumsum(stack, axis=0), strict=True):
            axes.plot(when, top, color=color, linewidth=1.1)
        return
    for color, s in zip(colors, series, strict=True):
        when = [datetime.fromtimestamp(t, UTC) for t in s.times]
        axes.plot(when, s.values, color=color, linewidth=1.3)


def _style_axes(axes: Axes, unit: str, *, start: float, end: float, width_in: float) -> None:
    axes.set_facecolor(PANEL)
    axes.set_xlim(datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))
    axes.set_ylim(bottom=0)
    axes.yaxis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
    axes.yaxis.set_major_formatter(FuncFormatter(unit_formatter(unit)))
    axes.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=max(4, int(width_in / 1.1))))
    # Seconds only where ticks come closer than a minute apart.
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if end - start < 150 else "%H:%M"))
    axes.tick_params(colors=MUTED, labelsize=FONT_PT, length=0)
    axes.tick_params(axis="x", pad=7)  # clear of the lowest value label at the left edge
    axes.grid(color=GRID, linewidth=0.6)
    for spine in axes.spines.values():
        spine.set_visible(False)


def render(
    prometheus: str,
    out: Path,
    *,
    start: float,
    end: float,
    scrape_interval_s: float = 15.0,
    dashboard: Path = DASHBOARD,
) -> None:
    """Draw every panel of ``dashboard`` over ``[start, end]`` from ``prometheus`` into ``out``."""
    panels = load_panels(dashboard)
    step_s = max(1.0, round((end - start) / 240))  # about 240 points across a panel, as Grafana's max data points
    interval = rate_interval(step_s, scrape_interval_s)
    title = json.loads(dashboard.read_text())["title"]
    span = f"{datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M:%S} to {datetime.fromtimestamp(end, UTC):%H:%M:%S} UTC"
    figure = DashboardFigure(panels)
    figure.header(title, f"{span} · step {step_s:g}s · $__rate_interval {interval} · from {prometheus}")
    with httpx.Client(base_url=prometheus, timeout=30, trust_env=False) as client:
        for panel in panels:
            if panel.type == "row":
                figure.row(panel)
            else:
                series = panel_series(client, panel, start=start, end=end, step_s=step_s, interval=interval)
                figure.panel(panel, series, start=start, end=end)
    figure.save(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="base URL of the Prometheus")
    parser.add_argument("--minutes", type=float, default=30, help="the time range: this many minutes up to now")
    parser.add_argument("--scrape-interval", type=float, default=15, help="seconds between scrapes of the service")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args(argv)
    end = time.time()
    render(
        args.prometheus,
        args.out,
        start=end - args.minutes * 60,
        end=end,
        scrape_interval_s=args.scrape_interval,
        dashboard=args.dashboard,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
