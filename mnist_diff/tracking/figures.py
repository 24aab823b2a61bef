"""Figures people would rather look at than tables (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mnist_diff.diffusion.schedules import make_schedule  # noqa: E402


def schedule_figure(settings: list[tuple[str, int, float, float]]):
    """alpha_bar and log-SNR against t/T for each (schedule, T, beta_start, beta_end)."""
    fig, (ax_ab, ax_snr) = plt.subplots(1, 2, figsize=(11, 4))
    for name, T, b0, b1 in settings:
        s = make_schedule(name, T, b0, b1)
        x = (s.betas.new_tensor(range(T)) + 1) / T
        label = f"{name} T={T}" + ("" if name == "cosine" else f" β_end={b1:g}")
        ax_ab.plot(x, s.alphas_cumprod, label=label)
        ax_snr.plot(x, s.log_snr, label=label)
    ax_ab.set(xlabel="t / T", ylabel="alpha_bar", title="signal left: alpha_bar(t)")
    ax_snr.set(xlabel="t / T", ylabel="log SNR", title="log SNR = log(alpha_bar / (1 - alpha_bar))")
    for ax in (ax_ab, ax_snr):
        ax.grid(alpha=0.3)
    ax_snr.legend(fontsize=7)
    fig.tight_layout()
    return fig


def curves_figure(history: list[dict]):
    """Training loss and FID against epoch."""
    fig, (ax_loss, ax_fid) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss (MSE on eps)", title="loss")
    scored = [h for h in history if h.get("fid") is not None]
    ax_fid.plot([h["epoch"] for h in scored], [h["fid"] for h in scored], marker="o", color="C1")
    ax_fid.set(xlabel="epoch", ylabel="FID", title="FID (selection samples)")
    for ax in (ax_loss, ax_fid):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
