"""``spm-rt bench report RESULTS.json``: pytest-benchmark JSON -> Markdown table + PNG plot.

Reads the results of ``pytest bench/ --benchmark-json RESULTS.json`` (bench/README.md). Every
figure is taken from that one run: medians and spreads of the measured rounds, and ratios to the
base pipeline measured in interleaved rounds (each variant round right after a base round; the
ratio is the median of the per-pair ratios, the spread their min-max). Writes ``RESULTS.md`` and
``RESULTS.png`` next to the JSON (or ``--out PREFIX``).

Example::

    $ spm-rt bench report bench/results/cpu_results.json
    wrote bench/results/cpu_results.md, bench/results/cpu_results.png
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

METHOD_ORDER = ("base", "reference", "peft", "merged", "gated")
METHOD_LABEL = {
    "base": "base pipeline",
    "reference": "reference way (unfused branch, rebuilt per prompt)",
    "peft": "diffusers/PEFT (K adapters)",
    "merged": "spm_rt merged",
    "gated": "spm_rt gated",
}
TARGET_MERGED_20 = 1.02  # merged, 1 prompt, 20-step generation with the merge, every K <= 64
TARGET_GATED_4 = 1.10  # gated, 4-prompt batch, K = 16
TARGET_STEPS = 20


def add_subcommands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark tools (the suite itself runs with pytest bench/)")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    report = sub.add_parser("report", help="pytest-benchmark JSON -> Markdown table and PNG plot of ratio to base vs K")
    report.add_argument("results", type=Path, help="JSON written by pytest bench/ --benchmark-json ...")
    report.add_argument("--out", type=Path, default=None,
                        help="output prefix (default: the JSON's path without .json): writes PREFIX.md and PREFIX.png")
    report.add_argument("--no-plot", action="store_true", help="Markdown only")
    report.set_defaults(func=_report_command)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])


def _report_command(args) -> int:
    from spm_rt.cli_common import CLIError

    try:
        load(args.results)  # refuse a file that is not a pytest-benchmark JSON before writing anything
    except (NotABenchmarkFile, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from exc
    out = args.out or args.results.with_suffix("")
    plot = not args.no_plot
    if plot:
        try:
            import matplotlib  # noqa: F401  (probe: the Markdown is written without it)
        except ImportError:
            md, _ = write_report(args.results, out, plot=False)
            print(f"wrote {md}")
            raise CLIError("the PNG plot needs matplotlib, which is not installed: pip install 'spm_rt[bench]' "
                           f"(the Markdown table {md} is written; --no-plot skips the plot)") from None
    md, png = write_report(args.results, out, plot=plot)
    print("wrote " + ", ".join(str(p) for p in (md, png) if p is not None))
    return 0


# ---------------------------------------------------------------------------------------------
# loading

class Result:
    """One benchmark of the suite (a pytest-benchmark entry with the suite's extra_info)."""

    def __init__(self, entry: dict):
        self.entry = entry
        self.name = entry.get("name", "?")
        self.stats = entry.get("stats", {})
        self.info = entry.get("extra_info", {}) or {}
        self.times = self.info.get("times") or self.stats.get("data") or []

    @property
    def ours(self) -> bool:
        return "scenario" in self.info and "method" in self.info

    def get(self, key, default=None):
        return self.info.get(key, default)

    @property
    def median(self) -> float:
        return float(self.stats.get("median", statistics.median(self.times) if self.times else float("nan")))

    @property
    def spread(self) -> tuple[float, float]:
        if self.times:
            return min(self.times), max(self.times)
        return float(self.stats.get("min", float("nan"))), float(self.stats.get("max", float("nan")))

    @property
    def ratio(self) -> float | None:
        r = self.info.get("ratio")
        return float(r) if r is not None else None

    @property
    def ratio_spread(self) -> tuple[float, float] | None:
        rs = self.info.get("paired_ratios")
        return (min(rs), max(rs)) if rs else None

    @property
    def base_median(self) -> float | None:
        b = self.info.get("base_times")
        return statistics.median(b) if b else None

    @property
    def key(self) -> tuple:
        return (self.get("arch"), self.get("scenario"), self.get("prompts"), self.get("method"), self.get("k"))


class NotABenchmarkFile(ValueError):
    """The JSON given to ``bench report`` is not a pytest-benchmark results file."""


def load(path: str | Path) -> tuple[dict, list[Result]]:
    """Read a pytest-benchmark JSON (``--benchmark-json``); anything else raises
    :class:`NotABenchmarkFile` instead of giving an empty report.

    Example::

        >>> data, results = load("bench/results/cpu_results.json")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotABenchmarkFile(f"{path}: not JSON ({exc})") from exc
    entries = data.get("benchmarks") if isinstance(data, dict) else None
    if (not isinstance(entries, list) or not entries or "machine_info" not in data
            or not all(isinstance(e, dict) and "stats" in e for e in entries)):
        raise NotABenchmarkFile(f"{path}: not a pytest-benchmark results file (expected 'machine_info' and a "
                                f"non-empty 'benchmarks' list with 'stats', as written by "
                                f"pytest bench/ --benchmark-json FILE)")
    return data, [Result(e) for e in entries]


# ---------------------------------------------------------------------------------------------
# formatting

def _t(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _r(ratio: float | None, spread: tuple[float, float] | None = None, digits: int = 3) -> str:
    if ratio is None:
        return "-"
    s = f"{ratio:.{digits}f}"
    if spread is not None:
        s += f" [{spread[0]:.{digits - 1}f}-{spread[1]:.{digits - 1}f}]"
    return s


def _span(values) -> tuple[float, float] | None:
    return (min(values), max(values)) if values else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _scenario_title(arch: str, scenario: str, prompts: int, sample: Result) -> str:
    what = {"step": "one UNet denoising step (CFG)", "generation": f"generation, {sample.get('steps')} steps (CFG)",
            "compiled-generation": f"torch.compile'd generation, {sample.get('steps')} steps (CFG), vs compiled base"}
    return f"{arch}: {what.get(scenario, scenario)}, {prompts} prompt{'s' if prompts > 1 else ''}"


def _sort_key(r: Result):
    m = r.get("method")
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, r.get("k") or 0)


def _verdict(value: float | None, target: float, spread: tuple[float, float] | None) -> str:
    if value is None:
        return "not measured"
    if value <= target:
        word = "HIT"
        if spread is not None and spread[1] > target:
            word += " (point estimate; the round-to-round spread crosses the target)"
    else:
        word = "MISSED"
        if spread is not None and spread[0] <= target:
            word += " (point estimate; the round-to-round spread crosses the target)"
    return word


# ---------------------------------------------------------------------------------------------
# targets

def _by_key(results: list[Result]) -> dict[tuple, Result]:
    return {r.key: r for r in results if r.ours}


def merged_20_step(results: list[Result], arch: str, k: int) -> dict | None:
    """spm_rt merged, 1 prompt, 20-step generation with the merge: measured when the suite ran
    20 steps, otherwise derived from the same run's n-step generation and step figures:
    ``(G_merged(n) + (20-n) S_merged) / (G_base(n) + (20-n) S_base)``."""
    idx = _by_key(results)
    gen = idx.get((arch, "generation", 1, "merged", k))
    if gen is None or gen.ratio is None:
        return None
    n = int(gen.get("steps") or 0)
    if n == TARGET_STEPS:
        return {"ratio": gen.ratio, "spread": gen.ratio_spread, "how": "measured"}
    step = idx.get((arch, "step", 1, "merged", k))
    if step is None or step.ratio is None or gen.base_median is None or step.base_median is None:
        return None
    extra = TARGET_STEPS - n

    def combo(gv, gb, sv, sb):
        return (gv + extra * sv) / (gb + extra * sb)

    point = combo(gen.median, gen.base_median, step.median, step.base_median)
    # spread: the same formula on the extreme paired ratios (variant = ratio x base median)
    lo = combo(gen.ratio_spread[0] * gen.base_median, gen.base_median,
               step.ratio_spread[0] * step.base_median, step.base_median)
    hi = combo(gen.ratio_spread[1] * gen.base_median, gen.base_median,
               step.ratio_spread[1] * step.base_median, step.base_median)
    return {"ratio": point, "spread": (lo, hi),
            "how": f"derived from the {n}-step generation and the step (same run)"}


def merge_share(results: list[Result], arch: str, k: int) -> float | None:
    """Merge cost / a base 20-step generation (text encoding + 20 steps) of the same run."""
    idx = _by_key(results)
    merge = idx.get((arch, "merge", 1, "merged", k))
    step = idx.get((arch, "step", 1, "base", 0))
    gen = idx.get((arch, "generation", 1, "base", 0))
    if merge is None or step is None or gen is None:
        return None
    n = int(gen.get("steps") or 0)
    base20 = gen.median + (TARGET_STEPS - n) * step.median
    return merge.median / base20


# ---------------------------------------------------------------------------------------------
# the report

def render_markdown(data: dict, results: list[Result], png_name: str | None = None) -> str:
    ours = [r for r in results if r.ours]
    others = [r for r in results if not r.ours]
    mi = data.get("machine_info", {})
    suite = mi.get("spm_rt_bench", {})
    run = data.get("spm_rt_bench", {})
    hw = suite.get("hardware", {})
    ver = suite.get("versions", {})
    out = ["# spm_rt benchmark report", ""]
    out.append(f"Run {data.get('datetime', '?')}: {hw.get('cpu', mi.get('cpu', {}).get('brand_raw', '?'))}, "
               f"{hw.get('cpu_count', '?')} cores, {hw.get('torch_threads', '?')} torch threads, device "
               f"{hw.get('device', '?')}{', GPU ' + hw['gpu'] if hw.get('gpu') else ''}; 1-min load average at start "
               f"{hw.get('loadavg_1min_at_start', '?')}" + (f", at end {run['loadavg_1min_at_end']}" if 'loadavg_1min_at_end' in run else "")
               + ".")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".")
    if run.get("session_seconds") is not None:
        out.append(f"Suite wall time: {run['session_seconds'] / 60:.1f} min.")
    for a in run.get("settings", {}).get("archs", []):
        out.append(f"Model `{a['name']}`: latents {a['latent']}x{a['latent']} (image {a['image']} px), {a['dtype']}, "
                   f"generations of {a['gen_steps']} steps, {a['step_rounds']} rounds per step case and "
                   f"{a['gen_rounds']} per generation case" + ("" if a.get("full_matrix", True) else
                                                               ", cut case matrix (see bench/README.md)") + ".")
    clock = run.get("settings", {}).get("clock") or next((r.get("clock") for r in ours if r.get("clock")), None)
    clock_note = {
        "cpu": "Clock: process CPU time (single-threaded run), so the time the process waited for a core "
               "while other work ran is not counted; wall-clock ratios are in the last table.",
        "process_time": "Clock: process CPU time (single-threaded run), so the time the process waited for a core "
                        "while other work ran is not counted; wall-clock ratios are in the last table.",
    }.get(clock, f"Clock: {clock or 'wall'}.")
    out += ["", "Ratios are to the base pipeline measured in the same run, in interleaved rounds (base round, "
            "then variant round); a ratio is the median of the per-round ratios, [min-max] their spread. "
            "Times are medians, [min-max] over the rounds. On a shared CPU only the ratios mean anything. "
            + clock_note, ""]

    # targets
    out += ["## Targets", ""]
    archs = sorted({r.get("arch") for r in ours}, key=lambda a: (a != "sd15", a))
    target_rows = []
    for arch in archs:
        ks = sorted({r.get("k") for r in ours if r.get("arch") == arch and r.get("method") == "merged"})
        for k in ks:
            m = merged_20_step(results, arch, k)
            if m is None:
                continue
            share = merge_share(results, arch, k)
            target_rows.append([arch, f"merged, 1 prompt, 20-step generation incl. merge, K={k}",
                                f"<= {TARGET_MERGED_20}", _r(m["ratio"], m["spread"], 4),
                                _verdict(m["ratio"], TARGET_MERGED_20, m["spread"]),
                                m["how"] + (f"; merge alone = {share * 100:.1f}% of a base 20-step generation"
                                            if share is not None else "")])
        idx = _by_key(results)
        for scenario in ("step", "generation"):
            g = idx.get((arch, scenario, 4, "gated", 16))
            if g is not None:
                target_rows.append([arch, f"gated, 4-prompt batch, K=16, {scenario}", f"<= {TARGET_GATED_4}",
                                    _r(g.ratio, g.ratio_spread, 4), _verdict(g.ratio, TARGET_GATED_4, g.ratio_spread),
                                    "measured"])
    if target_rows:
        out += _table(["model", "target", "goal", "ratio to base [spread]", "verdict", "how"], target_rows)
        out += ["", "The targets are stated for the CPU run of SD1.5's architecture (`sd15`); the tiny model's "
                "figures are dominated by per-module Python overhead and shown for reference."]
    else:
        out.append("No target could be evaluated from these results.")
    out.append("")

    # ratio pivots
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in ours:
        if r.get("scenario") in ("step", "generation"):
            groups[(r.get("arch"), r.get("scenario"), r.get("prompts"))].append(r)
    order = {"step": 0, "generation": 1}
    out += ["## Ratio to base vs K", ""]
    for key in sorted(groups, key=lambda g: (g[0] != "sd15", g[0], order.get(g[1], 9), g[2])):
        rs = sorted(groups[key], key=_sort_key)
        ks = sorted({r.get("k") for r in rs if r.get("method") != "base"})
        sample = rs[0]
        out.append(f"### {_scenario_title(*key, sample)}")
        out.append("")
        base = next((r for r in rs if r.get("method") == "base"), None)
        if base is not None:
            out.append(f"Base: {_t(base.median)} [{_t(base.spread[0])}-{_t(base.spread[1])}], "
                       f"{base.stats.get('rounds', len(base.times))} rounds; UNet batch {base.get('unet_batch')}, "
                       f"latents {base.get('latent')}, image {base.get('image')}, {base.get('dtype')}.")
            out.append("")
        rows = []
        for method in METHOD_ORDER[1:]:
            cells = []
            for k in ks:
                r = next((x for x in rs if x.get("method") == method and x.get("k") == k), None)
                cells.append(_r(r.ratio, r.ratio_spread) if r is not None else "")
            if any(cells):
                seq = any(x.get("options", {}).get("sequential_prompts") for x in rs if x.get("method") == method)
                rows.append([METHOD_LABEL[method] + (" (one prompt at a time)" if seq else "")] + cells)
        out += _table(["method"] + [f"K={k}" for k in ks], rows)
        out.append("")

    # merge / transport costs
    per_prompt = [r for r in ours if r.get("scenario") in ("merge", "transport")]
    if per_prompt:
        out += ["## Per-prompt costs", "",
                "`merge`: forming the merged weights of every adapted layer for one new gate vector "
                "(what spm_rt merged pays once per distinct prompt). `transport`: Facilitated Transport's "
                "gates for one prompt (one extra text-encoder pass). Ratio = cost / one base UNet step "
                "(CFG, 1 prompt) timed in the same rounds.", ""]
        rows = []
        for r in sorted(per_prompt, key=lambda r: (r.get("arch") != "sd15", r.get("arch"), r.get("scenario"), r.get("k"))):
            share = merge_share(results, r.get("arch"), r.get("k")) if r.get("scenario") == "merge" else None
            rows.append([r.get("arch"), r.get("scenario"), r.get("k"), f"{_t(r.median)} [{_t(r.spread[0])}-{_t(r.spread[1])}]",
                         _r(r.ratio, r.ratio_spread), f"{share * 100:.1f}%" if share is not None else "-",
                         f"{r.get('options', {}).get('merged_bytes', 0) / 2**20:.0f} MiB" if r.get("scenario") == "merge" else "-"])
        out += _table(["model", "cost", "K", "time [spread]", "in base UNet steps [spread]",
                       "share of a base 20-step generation", "merged copy"], rows)
        out.append("")

    # every measurement
    out += ["## All measurements", ""]
    rows = []
    for r in sorted(ours, key=lambda r: (r.get("arch") != "sd15", r.get("arch"), r.get("scenario"), r.get("prompts"), *_sort_key(r))):
        rows.append([r.get("arch"), r.get("scenario"), r.get("prompts"), r.get("method"), r.get("k") or "-",
                     r.get("steps") or "-", f"{_t(r.median)} [{_t(r.spread[0])}-{_t(r.spread[1])}]",
                     _t(r.base_median) if r.base_median is not None else "-",
                     _r(r.ratio, r.ratio_spread), _r(r.get("wall_ratio"), _span(r.get("wall_paired_ratios"))),
                     r.stats.get("rounds", len(r.times))])
    out += _table(["model", "scenario", "prompts", "method", "K", "steps", "median [min-max]", "paired base median",
                   "ratio [spread]", "wall-clock ratio [spread]", "rounds"], rows)
    out.append("")
    if others:
        out += ["## Other benchmarks in this file", ""]
        rows = [[r.name, r.entry.get("group") or "-", f"{_t(r.median)}", _t(float(r.stats.get("iqr", float("nan")))),
                 r.stats.get("rounds", "-")] for r in others]
        out += _table(["name", "group", "median", "IQR", "rounds"], rows)
        out.append("")
    if png_name:
        out += [f"![ratio to base vs K]({png_name})", ""]
    return "\n".join(out)


def plot_ratios(results: list[Result], path: Path) -> Path | None:
    """Ratio to base vs K, one line per method, one panel per (model, scenario, prompts); the
    per-prompt costs (merge, transport) in base UNet steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in results if r.ours and r.get("method") != "base" and r.ratio is not None]
    if not ours:
        return None
    rank = {"step": 0, "generation": 1, "merge": 2, "transport": 3}
    panels = sorted({(r.get("arch"), r.get("scenario"), r.get("prompts")) for r in ours},
                    key=lambda p: (p[0] != "sd15", p[0], rank.get(p[1], 9), p[2]))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    colors = {"reference": "tab:red", "peft": "tab:orange", "merged": "tab:blue", "gated": "tab:green",
              "transport": "tab:purple"}
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (arch, scenario, prompts) in zip(axes.flat, panels):
        rs = [r for r in ours if (r.get("arch"), r.get("scenario"), r.get("prompts")) == (arch, scenario, prompts)]
        methods = [m for m in METHOD_ORDER[1:] + ("transport",) if any(r.get("method") == m for r in rs)]
        all_ks = set()
        for method in methods:
            mr = sorted((r for r in rs if r.get("method") == method), key=lambda r: r.get("k"))
            ks = [r.get("k") for r in mr]
            all_ks.update(ks)
            ys = [r.ratio for r in mr]
            lo = [r.ratio - (r.ratio_spread or (r.ratio, r.ratio))[0] for r in mr]
            hi = [(r.ratio_spread or (r.ratio, r.ratio))[1] - r.ratio for r in mr]
            seq = any(r.get("options", {}).get("sequential_prompts") for r in mr)
            ax.errorbar(ks, ys, yerr=[lo, hi], marker="o", capsize=3, color=colors.get(method),
                        label=method + (" (one prompt at a time)" if seq else ""))
        if scenario in ("step", "generation", "compiled-generation"):
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
            steps = rs[0].get("steps")
            ax.set_title(f"{arch}: {scenario}{f', {steps} steps' if steps else ''}, {prompts} prompt"
                         f"{'s' if prompts > 1 else ''}", fontsize=9)
            ax.set_ylabel("ratio to base (same run)")
        else:
            ax.set_title(f"{arch}: {scenario} cost per prompt", fontsize=9)
            ax.set_ylabel("cost in base UNet steps (same run)")
            ax.set_ylim(bottom=0, top=max(1.2 * max((r.ratio_spread or (0, r.ratio))[1] for r in rs), 0.1))
        if prompts == 4 and scenario in ("step", "generation"):
            ax.axhline(TARGET_GATED_4, color="tab:green", lw=0.8, ls=":", label=f"gated target {TARGET_GATED_4} (K=16)")
        if scenario == "generation" and prompts == 1:
            derived = [(k, merged_20_step(results, arch, k)) for k in sorted(all_ks)]
            derived = [(k, d) for k, d in derived if d is not None and d["how"] != "measured"]
            if derived:
                ax.plot([k for k, _ in derived], [d["ratio"] for _, d in derived], ls=":", marker="s", mfc="none",
                        color="tab:blue", label="merged, 20 steps (derived)")
            ax.axhline(TARGET_MERGED_20, color="tab:blue", lw=0.8, ls=":", label=f"merged target {TARGET_MERGED_20} (20 steps)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_ks))
        ax.set_xticklabels([str(k) for k in sorted(all_ks)])
        ax.set_xlabel("K (SPMs)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("spm_rt vs the base pipeline (ratio, same run; bars: min-max over paired rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results_json: str | Path, out_prefix: str | Path, plot: bool = True) -> tuple[Path, Path | None]:
    """Write ``PREFIX.md`` (and ``PREFIX.png``); returns their paths.

    Example::

        >>> write_report("bench/results/cpu_results.json", "bench/results/cpu_results")  # doctest: +SKIP
    """
    data, results = load(results_json)
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = prefix.with_suffix(".md")
    md.write_text(render_markdown(data, results, None))  # the Markdown needs no matplotlib: written first
    if not plot:
        return md, None
    png = plot_ratios(results, prefix.with_suffix(".png"))
    if png is not None:
        md.write_text(render_markdown(data, results, png.name))
    return md, png
