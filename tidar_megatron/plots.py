"""Pictures people would rather see than read: the TiDAR attention mask and loss curves."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path
from .layout import TiDARLayout


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    with atomic_path(path) as tmp:  # never leave a half-written picture
        fig.savefig(tmp, dpi=130, bbox_inches="tight")


def draw_layout(layout: TiDARLayout, path: str | Path, title: str | None = None) -> Path:
    """The doubled sequence (token kinds and positions) above its attention mask."""
    plt = _pyplot()
    path = Path(path)
    keep = layout.dense_mask().numpy()
    n = layout.seq_len
    fig, (ax_seq, ax_mask) = plt.subplots(2, 1, figsize=(7, 8), gridspec_kw={"height_ratios": [1.6, 12]})
    is_mask = layout.is_mask.numpy()
    ax_seq.imshow(is_mask[None, :], cmap="coolwarm", vmin=-0.3, vmax=1.3, aspect="auto")
    for i, p in enumerate(layout.position_ids.tolist()):
        ax_seq.text(i, 0, f"{'M' if is_mask[i] else 'x'}{p}", ha="center", va="center", fontsize=6, rotation=90)
    ax_seq.set_yticks([])
    ax_seq.set_xticks([])
    ax_seq.set_title(title or f"TiDAR training sequence: L={layout.clean_len} clean tokens (x), "
                     f"then mask blocks of B={layout.block_size} (M), labelled with RoPE positions", fontsize=8)
    ax_mask.imshow(keep, cmap="Greys", interpolation="nearest")
    ax_mask.axhline(layout.clean_len - 0.5, color="tab:red", lw=0.8)
    ax_mask.axvline(layout.clean_len - 0.5, color="tab:red", lw=0.8)
    ax_mask.set_xlabel("key index (black = may attend)")
    ax_mask.set_ylabel("query index")
    ax_mask.set_xticks(range(0, n, max(1, n // 16)))
    ax_mask.set_yticks(range(0, n, max(1, n // 16)))
    _save(fig, path)
    plt.close(fig)
    return path


def _moving_average(values, window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw_losses(history: list[dict], path: str | Path, keys=("loss", "loss_ar", "loss_diff")) -> Path:
    """Loss curves from per-step metric dicts (each with a 'step' and the keys): raw and smoothed."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(h["step"], h[key]) for h in history if key in h]
        if not points:
            continue
        steps, values = zip(*points)
        line, = ax.plot(steps, values, alpha=0.25, lw=0.8)
        ax.plot(steps, _moving_average(values, max(len(values) // 30, 1)), color=line.get_color(), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tidar-megatron layout", description=draw_layout.__doc__)
    parser.add_argument("--clean-len", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--decoding-prefix", type=int, default=None,
                        help="draw one decoding pass after this many cached tokens instead of training")
    parser.add_argument("--output", default="tidar_layout.png")
    args = parser.parse_args(argv)
    if args.decoding_prefix is None:
        layout = TiDARLayout.for_training(args.clean_len, args.block_size)
        title = None
    else:
        layout = TiDARLayout.for_decoding(args.decoding_prefix, args.block_size)
        title = (f"decoding pass: {args.decoding_prefix} cached + {args.block_size} pending tokens (x), then "
                 f"one mask block (M) per acceptance length")
    print(draw_layout(layout, args.output, title))
    return 0
