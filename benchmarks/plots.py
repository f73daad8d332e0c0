"""Line plots of benchmark results, as PNG files (matplotlib's Agg backend: no display)."""
import math


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _points(xs, ys):
    """The (x, y) pairs with a finite y."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def facet_lines(path, panels, *, title, xlabel, ylabel, logx=True, logy=False, hline=None,
                styles=None, vlines=None):
    """Saves a row of line plots to ``path`` and returns it.

    ``panels``: a list of ``(subtitle, series)``; ``series`` maps a label to ``(xs, ys)``
    (points whose y is None are left out). ``styles`` maps a label to matplotlib keyword
    arguments replacing the default solid line with dots. ``hline`` draws a dotted
    horizontal line at that y in every panel; ``vlines`` is a list, per panel, of
    ``(x, text)`` marked by a dashed vertical line.
    """
    plt = pyplot()
    styles = styles or {}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 0.6, 4.0),
                             squeeze=False)
    handles = {}
    for i, (ax, (subtitle, series)) in enumerate(zip(axes[0], panels)):
        for label, (xs, ys) in series.items():
            px, py = _points(xs, ys)
            if px:
                style = {"marker": "o", "markersize": 4, **styles.get(label, {})}
                (line,) = ax.plot(px, py, label=label, **style)
                handles.setdefault(label, line)
        for x, text in (vlines[i] if vlines else []):
            ax.axvline(x, color="0.4", linestyle="--", linewidth=1)
            ax.annotate(text, (x, 0.5), xycoords=("data", "axes fraction"), rotation=90,
                        xytext=(-4, 0), textcoords="offset points", ha="right", va="center",
                        fontsize=8, color="0.3")
        if hline is not None:
            ax.axhline(hline, color="0.5", linestyle=":", linewidth=1)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(subtitle, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=11)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center",
                   ncol=min(len(handles), 4), fontsize=8, frameon=False)
    rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
