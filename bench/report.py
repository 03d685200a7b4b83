"""Markdown tables and PNG plots from the benchmark's records."""
from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np

from .methods import spec_budgets
from .metrics import geomean


def fmt_db(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v == float("inf"):
        return "∞"
    return "fail" if v <= 0 else f"{v:.1f}"


def fmt_e(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return "inf" if v == float("inf") else f"{v:.1e}"


def fmt_x(v):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}×"


def case_key(r):
    return (r["model"], r["family"], r["steps"], r["input"])


def case_name(key):
    model, family, steps, name = key
    return f"{model} {family} {steps} {name}"


def at_budget(records, budget):
    """{case: {method: record}}: iterative methods at ``budget``, one-call methods at 1."""
    table = defaultdict(dict)
    for r in records:
        iterative = r["method"] not in ("ddim", "native")
        if (iterative and r["budget"] == budget) or (not iterative):
            table[case_key(r)][r["method"]] = r
    return table


def ordered_methods(records, specs):
    present = {r["method"] for r in records}
    return [s for s in specs if s.key in present]


def score(r):
    """Exactness used for ranking: noise error where the exact noise is known, else PSNR."""
    if r.get("noise_err") is not None:
        return -r["noise_err"] if math.isfinite(r["noise_err"]) else -math.inf
    return r["psnr"]


def budget_table(records, specs, budget, value, fmt, title, model=None, better="high"):
    table = at_budget([r for r in records if model is None or r["model"] == model], budget)
    methods = ordered_methods([r for rows in table.values() for r in rows.values()], specs)
    head = "| case | " + " | ".join(
        f"{s.label}{'' if s.key in ('ddim', 'native') else f' ×{budget}'}" for s in methods) + " |"
    lines = [f"**{title}**", "", head, "|---" * (len(methods) + 1) + "|"]
    for key in sorted(table, key=lambda k: (k[0], k[1], k[2], k[3])):
        rows = table[key]
        vals = {s.key: value(rows[s.key]) for s in methods if s.key in rows}
        finite = [v for v in vals.values() if v is not None and math.isfinite(v)]
        best = (max(finite) if better == "high" else min(finite)) if finite else None
        cells = []
        for s in methods:
            v = vals.get(s.key)
            text = fmt(v) if s.key in vals else "—"
            if v is not None and best is not None and v == best:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {case_name(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(records, specs, budgets):
    """Photo model, per method and budget, over all cases: PSNR change against ddim
    (median, worst), cases at least as good as ddim, noise error, noise statistics,
    time and memory ratios."""
    photo = [r for r in records if r["model"] == "photo"]
    ddim = {case_key(r): r for r in photo if r["method"] == "ddim"}
    lines = ["| method | calls/step | median ΔPSNR vs ddim (dB) | worst ΔPSNR | cases ≥ ddim | "
             "noise error (gen, geomean) | noise std | kurtosis | autocorr | time ÷ ddim | memory ÷ ddim | backward/step |",
             "|---" * 12 + "|"]
    for s in ordered_methods(photo, specs):
        for b in spec_budgets(s, budgets):
            rows = [r for r in photo if r["method"] == s.key and r["budget"] == b]
            if not rows:
                continue
            delta = [r["psnr"] - ddim[case_key(r)]["psnr"] for r in rows
                     if math.isfinite(r["psnr"]) and math.isfinite(ddim[case_key(r)]["psnr"])]
            ok = sum(1 for r in rows if r["psnr"] >= ddim[case_key(r)]["psnr"] - 0.05)
            ne = [r["noise_err"] for r in rows if r.get("noise_err") is not None]
            stats = {k: np.nanmean([r[f"noise_{k}"] for r in rows]) for k in ("std", "kurtosis", "autocorr")}
            mem = [r["mem_ratio"] for r in rows if "mem_ratio" in r]
            backward = np.mean([r["backward"] / r["steps"] for r in rows])
            lines.append(
                f"| {s.label} | {b} | {np.median(delta):+.1f} | {min(delta):+.1f} | {ok}/{len(rows)} | "
                f"{fmt_e(geomean(ne))} | {stats['std']:.2f} | {stats['kurtosis']:+.2f} | "
                f"{stats['autocorr']:+.2f} | {fmt_x(geomean([r['time_ratio'] for r in rows]))} | "
                f"{fmt_x(geomean(mem)) if mem else '—'} | {backward:.0f} |")
    return "\n".join(lines)


def tiny_table(records, specs, budget):
    tiny = [r for r in records if r["model"] == "tiny"]
    if not tiny:
        return ""
    lines = ["| case | method | calls | latent PSNR (dB) | noise error | time ÷ ddim | "
             "ms outside the network per call | memory ÷ ddim |", "|---" * 8 + "|"]
    table = at_budget(tiny, budget)
    for key in sorted(table):
        for s in ordered_methods(list(table[key].values()), specs):
            r = table[key].get(s.key)
            if r is None:
                continue
            calls = f"{r['nfe']}" + ("" if not r["backward"] else f" + {r['backward']} bwd")
            lines.append(f"| {case_name(key)} | {s.label}{'' if not s.iterative else f' ×{budget}'} | {calls} | "
                         f"{fmt_db(r['psnr'])} | {fmt_e(r['noise_err'])} | {fmt_x(r['time_ratio'])} | "
                         f"{r['outside_ms_per_call']:.1f} | {fmt_x(r.get('mem_ratio'))} |")
    return "\n".join(lines)


def winners(records, specs, budget):
    """Per case, the method ranked first at ``budget`` calls/step (noise error where
    known, else PSNR) among the iterative methods and ddim."""
    table = at_budget(records, budget)
    out = {}
    for key, rows in table.items():
        cands = [r for m, r in rows.items() if m != "native"]
        out[key] = max(cands, key=score)["method"]
    return out


# ------------------------------------------------------------------------------ plots

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf", "#000000"]


def _style(i):
    """Marker and colour of the i-th method of the full method list (the same in every plot)."""
    markers = "os^vD<>pPX*h"
    return dict(marker=markers[i % len(markers)], color=COLORS[i % len(COLORS)], linewidth=1.4, markersize=4)


def _index(specs, key):
    return next(i for i, s in enumerate(specs) if s.key == key)


def plot_accuracy(records, specs, path, value="psnr", ylabel="reconstruction PSNR (dB)", log=False,
                  inputs=None, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    photo = [r for r in records if r["model"] == "photo" and (inputs is None or inputs(r["input"]))
             and r.get(value) is not None]
    panels = sorted({(r["family"], r["steps"]) for r in photo})
    if not panels:
        return None
    cols = len({p[1] for p in panels})
    rows_n = len({p[0] for p in panels})
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    methods = ordered_methods(photo, specs)
    fams = sorted({p[0] for p in panels})
    steps = sorted({p[1] for p in panels})
    for (family, n) in panels:
        ax = axes[fams.index(family)][steps.index(n)]
        for s in methods:
            i = _index(specs, s.key)
            pts = defaultdict(list)
            for r in photo:
                if r["family"] == family and r["steps"] == n and r["method"] == s.key:
                    v = r[value]
                    if value == "psnr":
                        v = max(v, 0.0) if math.isfinite(v) else 200.0
                    pts[r["nfe"] / n].append(v)
            if not pts:
                continue
            xs = sorted(pts)
            ys = [geomean(pts[x]) if log else float(np.mean(pts[x])) for x in xs]
            if s.iterative:
                ax.plot(xs, ys, label=s.label, **_style(i))
            else:
                ax.plot(xs, ys, linestyle="none", label=s.label, **dict(_style(i), markersize=8))
        ax.set_title(f"{family}, {n} steps")
        ax.set_xlabel("model calls per step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if len(labels) > 5 else 0.06, 1, 0.96 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_residuals(records, specs, path, budget):
    """Relative residual ||r|| / ||z_prev|| after each iteration, as each solver's history
    reports it (gnri/newton: of the best iterate so far by their objective; the others:
    of the current iterate), geometric mean over steps and inputs, at the largest budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    photo = [r for r in records if r["model"] == "photo" and r["budget"] == budget and r.get("history")]
    panels = sorted({(r["family"], r["steps"]) for r in photo})
    if not panels:
        return None
    fams = sorted({p[0] for p in panels})
    steps = sorted({p[1] for p in panels})
    fig, axes = plt.subplots(len(fams), len(steps), figsize=(4.2 * len(steps), 3.4 * len(fams)), squeeze=False)
    methods = ordered_methods(photo, specs)
    for (family, n) in panels:
        ax = axes[fams.index(family)][steps.index(n)]
        for s in methods:
            i = _index(specs, s.key)
            hs = [r["history"] for r in photo if r["family"] == family and r["steps"] == n
                  and r["method"] == s.key]
            if not hs:
                continue
            length = max(len(h) for h in hs)
            ys = [geomean([h[k] for h in hs if len(h) > k]) for k in range(length)]
            ax.plot(range(1, length + 1), ys, label=s.label, **_style(i))
        ax.set_yscale("log")
        ax.set_title(f"{family}, {n} steps")
        ax.set_xlabel("iteration (model call) within a step")
        ax.set_ylabel("relative residual ‖r‖/‖z_prev‖")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(records, specs, out_dir, budgets):
    os.makedirs(out_dir, exist_ok=True)
    paths = [plot_accuracy(records, specs, os.path.join(out_dir, "psnr_vs_calls.png"),
                           title="Exact photo model: reconstruction PSNR against model calls "
                                 "(mean over inputs)"),
             plot_accuracy(records, specs, os.path.join(out_dir, "noise_error_vs_calls.png"),
                           value="noise_err", ylabel="error of the inverted noise", log=True,
                           inputs=lambda n: n.startswith("gen"),
                           title="Exact photo model, generated images: relative error of the "
                                 "inverted noise (geomean)"),
             plot_residuals(records, specs, os.path.join(out_dir, "residual_vs_iteration.png"),
                            max(budgets))]
    return [p for p in paths if p]


def default_check(records, specs, key, budget=2, rank=True):
    """How ``key`` fares at ``budget`` calls/step in every case: rank among all methods at
    that budget (noise error where known, else PSNR; left out with ``rank=False``) and
    whether its PSNR is below the better of the two naive inversions (ddim, ComfyUI native)."""
    table = at_budget(records, budget)
    label = next((s.label for s in specs if s.key == key), key)
    first, worse, rows = 0, [], 0
    for case, rows_ in sorted(table.items()):
        if key not in rows_:
            continue
        rows += 1
        cands = [r for m, r in rows_.items() if m != "native" or r.get("noise_err") is None]
        ranked = sorted(cands, key=score, reverse=True)
        if ranked[0]["method"] == key or score(ranked[0]) == score(rows_[key]):
            first += 1
        naive = max(v["psnr"] for m, v in rows_.items() if m in ("ddim", "native") and math.isfinite(v["psnr"]))
        if rows_[key]["psnr"] < naive - 0.05:
            worse.append(f"{case_name(case)} ({rows_[key]['psnr']:.1f} vs {naive:.1f} dB)")
    text = (f"**{label}** at {budget} calls/step: " + (f"most exact in {first}/{rows} cases; " if rank else "")
            + f"below naive inversion (best of ddim and ComfyUI's) in {len(worse)}/{rows}")
    return text + (": " + "; ".join(worse) if worse else "") + "."


def tiny_summary(records, specs, budget):
    """Tiny ComfyUI models, per method over all cases: latent PSNR change against ddim
    (median, worst), noise error (generated inputs), wall time, time outside the network
    per model call, memory."""
    tiny = [r for r in records if r["model"] == "tiny"]
    if not tiny:
        return ""
    table = at_budget(tiny, budget)
    lines = ["| method | calls/step | median ΔPSNR vs ddim (dB) | worst ΔPSNR | noise error (gen, geomean) | "
             "time ÷ ddim | ms outside the network per call | memory ÷ ddim | backward/step |",
             "|---" * 9 + "|"]
    for s in ordered_methods(tiny, specs):
        rows = [rows_[s.key] for rows_ in table.values() if s.key in rows_]
        base = [rows_["ddim"] for rows_ in table.values() if s.key in rows_]
        delta = [r["psnr"] - b["psnr"] for r, b in zip(rows, base) if math.isfinite(r["psnr"]) and r["psnr"] > 0]
        failed = sum(1 for r in rows if not (math.isfinite(r["psnr"]) and r["psnr"] > 0))
        ne = [r["noise_err"] for r in rows if r.get("noise_err") is not None]
        mem = [r["mem_ratio"] for r in rows if "mem_ratio" in r]
        med = f"{np.median(delta):+.1f}" if delta else "—"
        worst = "fails (inf)" if failed else (f"{min(delta):+.1f}" if delta else "—")
        lines.append(f"| {s.label} | {1 if not s.iterative else budget} | {med} | {worst} | {fmt_e(geomean(ne))} | "
                     f"{fmt_x(geomean([r['time_ratio'] for r in rows]))} | "
                     f"{np.median([r['outside_ms_per_call'] for r in rows]):.2f} | {fmt_x(geomean(mem))} | "
                     f"{np.mean([r['backward'] / r['steps'] for r in rows]):.0f} |")
    return "\n".join(lines)
