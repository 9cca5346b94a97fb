"""Draw loss_curve.png from loss_metrics.csv: both training stages, every loss part.

    python plot_loss.py [--loss_csv=loss_metrics.csv] [--out_dir=res_hr]
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from config import cli_config  # noqa: E402
from utils import atomic_write  # noqa: E402

PARTS = ["total", "recon", "kl0", "kl1", "ot", "val_total"]


def plot_loss(loss_csv: str | Path, out_png: str | Path) -> Path:
    path = Path(loss_csv)
    if not path.is_file():
        raise SystemExit(f"plot_loss.py: error: {path}: " + ("a folder, not a file" if path.is_dir() else
                                                            "no such file; train first with train_safe.py"))
    try:
        df = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise SystemExit(f"plot_loss.py: error: {path}: not a loss_metrics.csv ({(str(e).splitlines() or ['unreadable'])[0]})") from None
    missing = [c for c in ["stage", "entity", "epoch"] + PARTS if c not in df.columns]
    if missing or df.empty:
        raise SystemExit(f"plot_loss.py: error: {path}: not a loss_metrics.csv ({'missing ' + str(missing) if missing else 'no rows'})")
    for part in PARTS:  # numbers; an empty cell (no validation loss) is a gap
        text = df[part].astype(str).str.strip()
        values = pd.to_numeric(text.where(text != "", "nan"), errors="coerce")
        bad = values.isna() & ~text.str.lower().isin(["", "nan"])
        if bad.any():
            raise SystemExit(f"plot_loss.py: error: {path}: line {int(bad.idxmax()) + 2}: {part} "
                             f"{df[part].iloc[int(bad.idxmax())]!r} is not a number")
        df[part] = values
    runs = [(stage, ent, g) for (stage, ent), g in df.groupby(["stage", "entity"], sort=False)]
    kept = {(stage, ent): kept_epoch(g) for stage, ent, g in runs}
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for ax, part in zip(axes.flat, PARTS):
        step = 0
        for stage, ent, g in runs:
            x = range(step, step + len(g))  # stages one after another on a shared epoch axis
            line, = ax.plot(x, g[part], marker="o", ms=3, label=f"{stage} ({ent})" if stage == "local" else "global")
            k = kept[(stage, ent)]
            if k is not None:  # the epoch train_safe.py kept: the lowest validation loss
                ax.plot(step + k, g[part].iloc[k], marker="*", ms=14, color=line.get_color(), mec="k")
            step += len(g)
        ax.set_title(part + (" (-log p(x | theta1))" if part == "recon" else ""))
        ax.set_xlabel("epoch (global, then local)")
    axes.flat[0].legend(fontsize=7)
    glob = [(g, kept[(s, e)]) for s, e, g in runs if s == "global" and kept[(s, e)] is not None]
    note = "; star: the epoch kept (lowest validation loss)"
    if glob:
        g, k = glob[-1]
        note += f", global epoch {int(g['epoch'].iloc[k])} of {len(g)}"
    fig.suptitle(f"training losses from {path.name}{note}")
    fig.tight_layout()
    out_png = Path(out_png)
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out_png


def kept_epoch(run: pd.DataFrame) -> int | None:
    """The row of a stage's run whose model train_safe.py kept: the first lowest finite validation
    loss (None when there is none)."""
    val = run["val_total"].to_numpy(dtype=float)
    finite = [i for i, v in enumerate(val) if v == v and abs(v) != float("inf")]
    return min(finite, key=lambda i: val[i]) if finite else None


def main(argv: list[str] | None = None) -> Path:
    cfg = cli_config(argv, description=__doc__, reads=("loss_csv", "out_dir"))
    try:
        out = plot_loss(cfg.loss_csv, Path(cfg.out_dir) / "loss_curve.png")
    except OSError as e:
        raise SystemExit(f"plot_loss.py: error: cannot write {Path(cfg.out_dir) / 'loss_curve.png'} "
                         f"({e.strerror or e})") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
