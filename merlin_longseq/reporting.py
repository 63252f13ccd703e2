"""Small report writer: a printed table, a markdown file and (when matplotlib is there) a bar plot."""
from __future__ import annotations

import os


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def write_report(run_dir: str, title: str, rows: list[dict], columns: list[str], plot_name: str | None = None,
                 plot_metrics: list[str] | None = None, log=print) -> str:
    table = format_table(rows, columns)
    log(f"\n{title}\n{table}\n")
    report_path = os.path.join(run_dir, "report.md")
    with open(report_path, "a") as f:
        f.write(f"## {title}\n\n{table}\n\n")
        if plot_name and plot_metrics and _bar_plot(os.path.join(run_dir, plot_name), title, rows, plot_metrics):
            f.write(f"![{title}]({plot_name})\n\n")
    return report_path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib (the `plot` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _bar_plot(path, title, rows, metrics) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        ax.bar([x + i * width for x in range(len(rows))], [r[metric] for r in rows], width, label=metric)
    ax.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels([str(r.get("arch", i)) for i, r in enumerate(rows)])
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
