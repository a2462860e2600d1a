"""The pieces every HTML report is made of: matplotlib figures embedded as PNG, tables, one page.

Reports open from disk with no server and no network: each figure is a base64 PNG inside an
`<img>` (with `data-plot="<name>"` and alt text, so tests and screen readers find it), the style
sheet is inline, and nothing is fetched. Colours are the Okabe-Ito palette, which stays
distinguishable under the common colour-vision deficiencies; markers and line styles vary too,
so a plot also reads in grey.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# Okabe & Ito (2008), "Color Universal Design": blue, orange, green, vermillion, purple, sky, yellow, black.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def linestyle(i: int) -> str:
    return LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]


def new_figure(width: float = 6.4, height: float = 3.6, ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure (Agg: no display needed) and its axes, in the house style."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    # Labels are user data (method names, clients, groups): a `$` in one is text, not mathtext
    # (whose parser raises on e.g. `$x^$` and would crash the whole report).
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), layout="constrained", squeeze=True)
    for ax in axes if ncols > 1 else [axes]:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def embed(fig: Any, name: str, alt: str, dpi: int = 110) -> str:
    """The figure as an inline PNG `<img>`; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<figure><img data-plot="{html.escape(name)}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def percent(value: float, digits: int = 1) -> str:
    """x100 with `digits` decimals; '-' for NaN (the house format of AUC-like values)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def table(frame: pd.DataFrame, name: str, caption: str = "") -> str:
    """A plain HTML table (`data-table="<name>"`) of already formatted cells."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False))
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table data-table="{html.escape(name)}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


@dataclass
class Section:
    """One titled part of a page: its HTML pieces (paragraphs, tables, figures) in order."""

    title: str
    parts: list[str] = field(default_factory=list)
    anchor: str = ""

    def text(self, words: str) -> Section:
        self.parts.append(f"<p>{html.escape(words)}</p>")
        return self

    def add(self, piece: str) -> Section:
        self.parts.append(piece)
        return self


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
nav a{margin-right:.8rem}table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
caption{text-align:left;font-style:italic;padding:.2rem 0}figure{margin:1rem 0}img{max-width:100%;height:auto}
figcaption{font-size:.85rem;color:#555}.note{color:#555;font-size:.9rem}code{background:#f5f5f5;padding:0 .2rem}
"""


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """A self-contained HTML document: inline style, no scripts, no external resources."""
    anchors = [s.anchor or f"s{i}" for i, s in enumerate(sections)]
    nav = " ".join(f'<a href="#{a}">{html.escape(s.title)}</a>' for a, s in zip(anchors, sections))
    body = "".join(f'<section id="{a}"><h2>{html.escape(s.title)}</h2>{"".join(s.parts)}</section>' for a, s in zip(anchors, sections))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
        f'<body><h1>{html.escape(title)}</h1><p class="note">{html.escape(subtitle)}</p><nav>{nav}</nav>{body}</body></html>\n'
    )


def write_page(path: Path, document: str) -> Path:
    """Write atomically (a hidden temporary file, then a rename): a reader never sees half a page."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(document, encoding="utf-8")
    tmp.replace(path)
    return path


def legend_outside(ax: Any, title: str | None = None) -> None:
    """A legend to the right of the axes, so it never hides data."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title=title, frameon=False)


def grouped_bars(ax: Any, categories: Sequence[str], series: dict[str, tuple[Sequence[float], Sequence[float] | None]], *, scale: float = 1.0, styles: Sequence[int] | None = None) -> None:
    """Bars side by side per category, one colour (and hatch) per series, with error bars where
    given (NaN errors are drawn as none). `series`: label -> (values, errors), both per category;
    `styles`: each series' colour / hatch index (default 0, 1, ...), so a series keeps its colour
    in a plot that leaves another out."""
    import numpy as np

    hatches = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    for i, (name, (values, errors)) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        style = styles[i] if styles is not None else i
        yerr = None if errors is None else np.nan_to_num(scale * np.asarray(errors, dtype=float))
        ax.bar(x + offset, scale * np.asarray(values, dtype=float), width, yerr=yerr, capsize=2, color=color(style), hatch=hatches[style % len(hatches)], edgecolor="white", label=name)
    ax.set_xticks(x, [str(c) for c in categories], rotation=30 if len(categories) > 8 else 0, ha="right" if len(categories) > 8 else "center")
