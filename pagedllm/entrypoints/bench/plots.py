"""PNG plots for the bench commands, drawn only when asked (--plot).

matplotlib is imported here, inside the functions, so the engine and the
other commands never need it: `pip install pagedllm[bench]` brings it.
"""

from __future__ import annotations


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'pagedllm[bench]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_concurrency(runs: list[dict], path: str, title: str = "") -> None:
    """Output tokens/s against the number of requests allowed to run at once (max_num_seqs)."""
    plt = _pyplot()
    xs = [r["max_num_seqs"] for r in runs]
    ys = [r["output_tokens_per_s"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent requests (max_num_seqs)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(0, max(ys) * 1.15)  # room for the labels
    ax.set_title(title or "Offline throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(paged, contiguous, path: str, title: str = "") -> None:
    """KV utilization (top) and requests running (bottom) per engine step, paged against contiguous (memory.Trace)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for trace, style in ((paged, "-"), (contiguous, "--")):
        steps = range(1, len(trace.kv_utilization) + 1)
        label = f"{trace.name} (blocks of {trace.block_size})"
        # No blocks in use (the end of the run): no utilization to draw, rather than a drop to 0.
        util = [100 * u if b else float("nan") for u, b in zip(trace.kv_utilization, trace.used_blocks)]
        top.plot(steps, util, style, label=label)
        bottom.plot(steps, trace.num_running, style, label=label)
    top.set_ylabel("KV utilization (%)")
    top.set_ylim(0, 105)
    top.legend(loc="best", fontsize=8)
    bottom.set_ylabel("requests running")
    bottom.set_xlabel("engine step")
    bottom.set_ylim(bottom=0)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.set_title(title or "KV memory: paged vs contiguous")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
