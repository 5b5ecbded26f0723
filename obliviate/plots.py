"""The residual-memory curve of a deletion (like the paper's Fig. 2), as a PNG, drawn from its
audit record."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_deltas(record: dict, epsilon: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, last, stop = record["first_block"], record["last_affected_block"], record["stop_block"]
    deltas = np.asarray(record["deltas"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(first, stop + 1), deltas, "o-", ms=3, label=r"$\Delta_k$")
    if record["fits"]:
        fit = record["fits"][-1]
        x = np.linspace(1, stop - last + 1, 200)  # x = 1 at the last affected block
        y = (fit["a"] * x ** -fit["h"] + fit["b"]) * deltas[last - first]  # undo normalisation
        label = f"a·x^-h+b, h={fit['h']:.2f}, |slope|={abs(fit['slope']):.3g}"
        ax.plot(last - 1 + x, y, "--", label=label)
    ax.axvline(stop, color="grey", lw=0.8)
    ax.set_xlabel("block k")
    ax.set_ylabel(r"$\|(P_k-P_{k-1})-(P'_k-P'_{k-1})\|_1$")
    ax.set_title(f"{record['request_id']}: stop at {stop} (t={record['t']}, {record['reason']}, "
                 f"ε={epsilon})", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
