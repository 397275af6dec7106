"""The PNG of `rnq-ep simulate`: time per layer vs GPUs, tokens per GPU in plain EP's worst layer, the skew sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rnq_ep.policies import PolicyRun

PLOT_POLICIES = ("plain EP", "EPLB +12.5 % mem, least-loaded", "LLEP spill", "R&Q bf16+int8", "R&Q bf16+int8+int4 + re-plan")


def plot_study(runs_by_gpus: dict[int, list[PolicyRun]], sweep: dict, path: Path, model_name: str) -> None:
    """PNG: time per layer vs GPU count, tokens per GPU in plain EP's worst layer, and the sweep's ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(18 if sweep else 12, 4.5))
    gpus = list(runs_by_gpus)
    for i, name in enumerate(r.policy for r in runs_by_gpus[gpus[0]]):
        times = [next(r.layer_s for r in runs_by_gpus[g] if r.policy == name) * 1e6 for g in gpus]
        replans = name.endswith(" + re-plan")  # past the colour cycle's 10: told apart by line and marker
        axes[0].plot(gpus, times, marker="s" if replans else "o", linestyle=":" if replans else "-" if i < 6 else "--",
                     linewidth=2.5 if replans else 1.5, label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="GPUs", ylabel="MoE us per layer (cost model)",
                title=f"{model_name}: step time vs GPUs")
    axes[0].set_xticks(gpus, [str(g) for g in gpus])
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=7)
    g = min(gpus, key=lambda n: abs(n - 32))
    runs = {r.policy: r for r in runs_by_gpus[g] if not r.error}
    plain = runs["plain EP"].gpu_loads
    worst = int(np.argmax(plain.max(axis=1) / plain.mean(axis=1)))
    shown = [n for n in PLOT_POLICIES if n in runs]
    width = 0.8 / len(shown)
    for i, name in enumerate(shown):
        loads = runs[name].gpu_loads[worst]
        axes[1].bar(np.arange(g) + (i - (len(shown) - 1) / 2) * width, loads, width, label=f"{name} (max/mean {loads.max() / loads.mean():.2f})")
    axes[1].set(xlabel="GPU", ylabel="(token, expert) assignments", title=f"tokens per GPU, {g} GPUs, plain EP's worst layer")
    axes[1].legend(fontsize=7)
    if sweep:
        exponents = list(sweep)
        for name in (r.policy for r in next(iter(sweep.values()))[1]):
            ratio = [next(r.layer_s for r in runs if r.policy == name) / runs[0].layer_s for _, runs in sweep.values()]
            axes[2].plot(exponents, ratio, marker="o", label=name)
        axes[2].set(xlabel="Zipf exponent s", ylabel="time / plain EP", title="skew sweep (lower is faster)")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
