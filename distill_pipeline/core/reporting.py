"""Small renderers for what people read in the UI: markdown tables and embedded plots."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_CELL_CHARS = 120


def _cell(value: Any, max_chars: int | None) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    return text if max_chars is None or len(text) <= max_chars else text[: max_chars - 1] + "…"


def markdown_table(
    rows: Iterable[Mapping[str, Any]] | Iterable[Sequence[Any]],
    columns: Sequence[str],
    *,
    max_cell_chars: int | None = MAX_CELL_CHARS,
) -> str:
    """A markdown table; cells are flattened to one line and cut to ``max_cell_chars`` (None: a
    table of figures the program composed, whose every word matters)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        lines.append("| " + " | ".join(_cell(v, max_cell_chars) for v in values) + " |")
    return "\n".join(lines)


def counts_table(counts: Mapping[Any, int], key_name: str, total: int | None = None) -> str:
    total = total if total is not None else sum(counts.values())
    rows = [(k, f"{v:,}", f"{(v / total if total else 0):.1%}") for k, v in counts.items()]
    return markdown_table(rows, [key_name, "rows", "share"])


def histogram_markdown(values: Sequence[float], *, title: str, xlabel: str, bins: int = 40, log_x: bool = True) -> str:
    """A histogram rendered to PNG and embedded in markdown as a data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    if len(data):
        if log_x and data.min() > 0:
            edges = np.logspace(np.log10(data.min()), np.log10(data.max() + 1), bins)
            ax.set_xscale("log")
        else:
            edges = bins
        ax.hist(data, bins=edges, color="#4f6bed")
        ax.axvline(
            float(np.median(data)), color="black", linestyle="--", linewidth=1, label=f"median {np.median(data):.0f}"
        )
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![{title}](data:image/png;base64,{encoded})"


def parquet_sample_markdown(path: Any, columns: Sequence[str], *, limit: int = 10, where: str = "TRUE") -> str:
    """A few rows of a Parquet file as a markdown table."""
    from distill_pipeline.core import duck

    con = duck.connect()
    try:
        rows = con.execute(
            f"SELECT {', '.join(columns)} FROM read_parquet({duck.sql_string(str(path))}) WHERE {where} LIMIT {int(limit)}"
        ).fetchall()
    finally:
        con.close()
    return markdown_table(rows, columns) if rows else "_no rows_"


def parquet_length_histogram(path: Any, column: str, *, title: str, sample_rows: int = 200_000) -> str:
    """Histogram of a text column's length in characters, from a sample of a Parquet file."""
    from distill_pipeline.core import duck

    con = duck.connect()
    try:
        lengths = [
            row[0]
            for row in con.execute(
                f"SELECT length({column}) FROM read_parquet({duck.sql_string(str(path))}) "
                f"USING SAMPLE reservoir({int(sample_rows)} ROWS) REPEATABLE (7)"
            ).fetchall()
        ]
    finally:
        con.close()
    return histogram_markdown(lengths, title=title, xlabel="characters")


@dataclass(frozen=True)
class LineSeries:
    """One series of a line plot; ``style`` is a matplotlib format string ("o" points, "--" dashes)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"
    color: str | None = None


def line_plot_markdown(
    series: Sequence[LineSeries], *, title: str, xlabel: str, ylabel: str, log_x: bool = False
) -> str:
    """A line plot rendered to PNG and embedded in markdown as a data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for line in series:
        ax.plot(list(line.x), list(line.y), line.style, label=line.label, color=line.color)
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _figure_markdown(fig, title)


def _figure_markdown(fig: Any, title: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![{title}](data:image/png;base64,{encoded})"
