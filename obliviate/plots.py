"""The residual-memory curve of a deletion (like the paper's Fig. 2), as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_deltas(sweep, epsilon: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = np.arange(sweep.first, sweep.stop + 1)
    deltas = np.asarray(sweep.deltas)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(blocks, deltas, "o-", ms=3, label=r"$\Delta_k$")
    if sweep.fits:
        fit = sweep.fits[-1]
        base = deltas[sweep.last_affected - sweep.first]
        x = np.linspace(1, len(blocks) - (sweep.last_affected - sweep.first), 200)
        y = (fit["a"] * x ** -fit["h"] + fit["b"]) * base
        ax.plot(
            sweep.last_affected - 1 + x,
            y,
            "--",
            label=f"fit a·x^-h+b (h={fit['h']:.2f}), |slope|={abs(fit['slope']):.3g}",
        )
    ax.axvline(sweep.stop, color="grey", lw=0.8)
    ax.set_xlabel("block k")
    ax.set_ylabel(r"$\|(P_k-P_{k-1})-(P'_k-P'_{k-1})\|_1$")
    ax.set_title(f"stopped at block {sweep.stop} (t={sweep.t}, {sweep.reason}, ε={epsilon})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
