"""Pictures people would rather see than read: the TiDAR attention mask and loss curves."""

from __future__ import annotations

import argparse
from pathlib import Path

from tidar_megatron.atomic import atomic_path
from tidar_megatron.console import entry_point
from tidar_megatron.layout import TiDARLayout


class PlotsUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:  # a cluster image may lack it: plots are skipped, nothing else is
        raise PlotsUnavailable("matplotlib is not installed; no plot drawn (pip install matplotlib)") from None

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


def _curve(ax, points, label, smooth: bool):
    steps, values = zip(*points)
    if not smooth:
        return ax.plot(steps, values, marker="o", ms=3, label=label)
    line, = ax.plot(steps, values, alpha=0.25, lw=0.8)
    ax.plot(steps, _moving_average(values, max(len(values) // 30, 1)), color=line.get_color(), label=label)


def draw_training(history: list[dict], validation: list[dict], path: str | Path) -> Path:
    """Training losses (raw and smoothed) and validation losses against steps; beside them, when the run
    validates drafts, the estimated tokens per pass and the draft accuracy at each block offset."""
    plt = _pyplot()
    path = Path(path)
    drafts = [v for v in validation if "est_tokens_per_pass" in v]
    fig, axes = plt.subplots(1, 2 if drafts else 1, figsize=(13 if drafts else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for key in ("loss", "loss_ar", "loss_diff"):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            _curve(ax, points, f"train {key}", smooth=True)
        points = [(v["step"], v[key]) for v in validation if key in v]
        if points:
            _curve(ax, points, f"valid {key}", smooth=False)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if drafts:
        ax = axes[0, 1]
        _curve(ax, [(v["step"], v["est_tokens_per_pass"]) for v in drafts], "estimated tokens per pass", False)
        ax.set_xlabel("step")
        ax.set_ylabel("tokens per forward pass (greedy, estimated)")
        twin = ax.twinx()
        last = drafts[-1]["draft_accuracy"]
        for r in sorted({0, 1, len(last) // 2, len(last) - 1}):
            points = [(v["step"], v["draft_accuracy"][r]) for v in drafts]
            steps, values = zip(*points)
            twin.plot(steps, values, ls="--", lw=1, label=f"draft accuracy, offset {r}")
        twin.set_ylabel("draft accuracy")
        twin.set_ylim(0, 1)
        twin.legend(fontsize=7, loc="lower right")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def draw_acceptance(by_block_size: dict, path: str | Path) -> Path:
    """Per block size: how many decoding passes kept 1, 2, ..., B tokens (greedy TiDAR)."""
    plt = _pyplot()
    path = Path(path)
    n = len(by_block_size)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5), squeeze=False)
    for ax, (block, report) in zip(axes[0], by_block_size.items()):
        hist = report["acceptance_histogram"]
        ax.bar(range(1, len(hist) + 1), hist, color="tab:blue")
        ax.set_title(f"block {block}: {report['tokens_per_pass']:.2f} tokens per pass", fontsize=9)
        ax.set_xlabel("tokens kept by a pass")
        ax.set_ylabel("passes")
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    plt.close(fig)
    return path


@entry_point("tidar-megatron layout")
def main(argv: list[str] | None = None) -> int:
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
