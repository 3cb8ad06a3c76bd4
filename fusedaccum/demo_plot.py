"""The plot of ``python -m fusedaccum demo``: loss curves, distance to large-batch training,
fixed K against K from the noise scale, and the noise scale over training."""

import math

# The runs' names in demo.py.
LARGE, ACCUMULATED, NAIVE, ADAPTIVE = "large batch", "GradAccumulator", "naive loop", "adaptive K"


def plot(curves, drift, labels, out, epochs, progress, noise, ks, extras_hint):
    """The demo's four panels (see demo.py), saved to ``out``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise SystemExit(f"the demo needs matplotlib ({exc}): {extras_hint}") from None
    fig = Figure(figsize=(11, 8.4))
    FigureCanvasAgg(fig)  # no pyplot, no global backend state
    (ax_loss, ax_drift), (ax_images, ax_noise) = fig.subplots(2, 2)
    styles = {LARGE: dict(color="black", lw=2.5, alpha=0.5),
              ACCUMULATED: dict(color="tab:blue", lw=1.0, ls="--"),
              NAIVE: dict(color="tab:red", lw=1.0),
              ADAPTIVE: dict(color="tab:green", lw=1.0)}
    for name in (ACCUMULATED, ADAPTIVE):
        ax_images.plot([p[2] for p in progress[name]], [p[0] for p in progress[name]], marker="o", ms=3,
                       label=labels[name], **styles[name])
        # Until |G|²'s average is clearly positive the ratio is meaningless (negative, or
        # huge): those points are left out (the policy keeps K then).
        ax_noise.plot(range(1, len(noise[name]) + 1), [v if v > 0 else math.nan for v in noise[name]],
                      label=f"left: b_simple, {labels[name]}", **styles[name])
    ax_images.set(xlabel="images seen", ylabel="training-set loss", yscale="log",
                  title="fixed K against K from the noise scale")
    ax_images.legend()
    ax_noise.set(xlabel="optimizer step", ylabel="b_simple (images), left axis", yscale="log",
                 title="noise scale (left axis) and adaptive K (right axis)")
    # Two y-axes: the legend names each series' axis, and the right one wears K's colour.
    ax_k = ax_noise.twinx()
    ax_k.step(range(1, len(ks) + 1), ks, where="post", color="tab:orange", lw=1.0,
              label="right: K of the adaptive run")
    ax_k.set_ylabel("K (micro-batches per step), right axis", color="tab:orange")
    ax_k.tick_params(axis="y", colors="tab:orange")
    handles = ax_noise.get_legend_handles_labels()
    ax_noise.legend(handles[0] + ax_k.get_legend_handles_labels()[0],
                    handles[1] + ax_k.get_legend_handles_labels()[1], fontsize="small")
    for name, values in curves.items():
        if name == ADAPTIVE:
            continue
        ax_loss.plot(range(1, len(values) + 1), values, label=labels[name], **styles[name])
    ax_loss.set(xlabel="optimizer step", ylabel="training loss of the window", yscale="log",
                title="loss curves")
    ax_loss.legend()
    for name, values in drift.items():
        if name not in (LARGE, ADAPTIVE):
            ax_drift.plot(range(1, epochs + 1), [max(v, 1e-12) for v in values], marker="o", ms=3,
                          label=labels[name], **styles[name])
    ax_drift.set(xlabel="epoch", ylabel="max |w - w_large batch|", yscale="log",
                 title="distance to large-batch training")
    ax_drift.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
