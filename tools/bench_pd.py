"""`vdevctl bench pd`: prefill/decode co-location policies against static splits, in the simulator and live.

The setups (Qwen2.5-7B shapes, 910B2 chips, the Azure conversation trace, every request to its full length):
- direct (fifo): each chip runs one engine doing both phases — passthrough;
- fifo co-location: a prefill and a decode engine per chip (one KV pool), arrival order;
- static co-location: the same, each phase in a fixed half of the cores (vNPU templates);
- flex co-location: the same under the flex policy (its default TPOT target on device step time);
- static disaggregation: prefill engines on some chips, decode engines on the others (KV over HCCS), the PD ratio
  chosen by the `pd_ratio` sweep at the highest rate.
Simulated: NPUS chips at a sweep of request rates; each comparison is at the same rate per chip. Then the
figures the conclusions rest on are re-run across the device-model constants nobody has measured (per-core
memory path, launch overhead), and the co-location policies across three traces (conversation, code, fixed
2048/128) and several seeds, with the targets checked per trace. Live: the co-location policies through the
daemon for a small sweep (the same engines, batching and chips in real processes, paced at SERVE_TIME_SCALE).
Full run only: one simulated hour of a 16-chip deployment, timed. Plots: TTFT and TPOT vs rate, goodput vs
rate, and a timeline of the cores each phase holds on one chip.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from npu.profiles import ChipProfile, profile
from scheduler.policies import make_policy
from sim.run import Workload, simulate
from sim.serving import SimSpec
from tools.bench_fidelity import sweeps
from workloads.model import model_config
from workloads.spec import ServeSpec
from workloads.tables import plain
from workloads.traffic import CODE, CONVERSATION, DEFAULT_SLO, Length, Lengths

MODEL = "qwen2.5-7b"
CHIP = profile("910B2")
NPUS = 4
HOST_MS = 1.0  # the serving engine's own work per step, modeled (a graph replay's inputs and launch)
SETUPS = {  # label: (deployment, policy, options)
    "direct (fifo)": ("direct", "fifo", ()),
    "fifo co-location": ("colocated", "fifo", ()),
    "static co-location": ("colocated", "static", ()),
    "flex co-location": ("colocated", "flex", ()),
    "static disaggregation": ("disaggregated", "fifo", ()),
}
STATIC, FLEX, DISAGG, FIFO = "static co-location", "flex co-location", "static disaggregation", "fifo co-location"
TRACES = {"conversation": CONVERSATION, "code": CODE, "fixed 2048/128": Lengths.fixed(2048, 128)}


def spec(label: str, npus: int = NPUS, chip: ChipProfile = CHIP, prefill_npus: int = 0, fold: int = 28) -> SimSpec:
    deployment, policy, options = SETUPS[label]
    return SimSpec(
        model=model_config(MODEL),
        chip=chip,
        deployment=deployment,
        npus=npus,
        prefill_npus=prefill_npus if deployment == "disaggregated" else 0,
        serve=ServeSpec.for_model(MODEL, policy=policy, policy_options=dict(options)),
        host_ms=HOST_MS,
        fold=fold,
        keep_itl=False,
    )


def _summary(outcome) -> dict:
    s = outcome.summary(DEFAULT_SLO)
    return {
        k: s[k] for k in ("completed", "failed", "request_throughput", "sustained_tokens_per_s", "goodput", "wall_s")
    } | {
        "ttft_s": s["ttft_s"],
        "tpot_s": s["tpot_s"],
        "duration_s": s["duration_s"],
    }


def _workload(rate_per_npu: float, npus: int, seconds: float, lengths: Lengths = CONVERSATION, seed: int = 0):
    rate = rate_per_npu * npus
    return Workload(lengths, rate, max(16, round(rate * seconds)), seed)


def pd_ratio(rate_per_npu: float, seconds: float, npus: int = NPUS) -> dict:
    """Static disaggregation's prefill:decode chips, each split tried at a high rate: the best by goodput, then by
    throughput."""
    tried = {}
    for p in range(1, npus):
        out = simulate(spec(DISAGG, npus, prefill_npus=p), _workload(rate_per_npu, npus, seconds), jobs=1)
        tried[f"{p}:{npus - p}"] = _summary(out)
    best = max(tried, key=lambda k: (round(tried[k]["goodput"], 2), tried[k]["request_throughput"]))
    return {"rate_per_npu": rate_per_npu, "tried": tried, "chosen": best}


def sweep(rates: list[float], seconds: float, prefill_npus: int, chip: ChipProfile = CHIP, labels=None) -> dict:
    runs: dict[str, dict[str, dict]] = {}
    for label in labels or SETUPS:
        runs[label] = {}
        for rate in rates:
            s = spec(label, chip=chip, prefill_npus=prefill_npus)
            runs[label][f"{rate:g}"] = _summary(simulate(s, _workload(rate, NPUS, seconds), jobs=2))
    return runs


def compare(runs: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per rate: flex vs static co-location (TTFT, TPOT, throughput, goodput) and flex vs disaggregation."""
    out = {}
    for rate, f in runs[FLEX].items():
        s, d = runs[STATIC][rate], runs[DISAGG][rate]
        out[rate] = {
            "ttft_mean_change_pct": _pct(f["ttft_s"]["mean"], s["ttft_s"]["mean"]),
            "ttft_p99_change_pct": _pct(f["ttft_s"]["p99"], s["ttft_s"]["p99"]),
            "tpot_mean_change_pct": _pct(f["tpot_s"]["mean"], s["tpot_s"]["mean"]),
            "throughput_change_pct": _pct(f["sustained_tokens_per_s"], s["sustained_tokens_per_s"]),
            "goodput_ratio": f["goodput"] / s["goodput"] if s["goodput"] else math.inf,
            "vs_disagg_throughput_pct": _pct(f["sustained_tokens_per_s"], d["sustained_tokens_per_s"]),
            "vs_disagg_goodput_ratio": f["goodput"] / d["goodput"] if d["goodput"] else math.inf,
        }
    return out


def _pct(new: float | None, old: float | None) -> float | None:
    return None if not old or new is None else (new / old - 1) * 100


def traces(rates: list[float], seconds: float, seeds: int) -> dict:
    """The co-location policies on each trace, every rate, `seeds` seeds; per trace the targets, checked on the
    seeds' mean goodput and worst TPOT p99: flex's goodput >= static's and fifo's at every rate, flex's TPOT p99
    within the SLO wherever static's is, and flex's TTFT p50 change against static's at static's knee (its last rate
    with TTFT p99 within the SLO)."""
    out = {}
    for name, lengths in TRACES.items():
        runs = {label: {} for label in (FIFO, STATIC, FLEX)}
        for label in runs:
            for rate in rates:
                outs = [
                    _summary(simulate(spec(label), _workload(rate, NPUS, seconds, lengths, seed), jobs=2))
                    for seed in range(seeds)
                ]
                runs[label][f"{rate:g}"] = {
                    "goodput": float(np.mean([o["goodput"] for o in outs])),
                    "ttft_p50_s": float(np.mean([o["ttft_s"]["p50"] for o in outs])),
                    "ttft_p99_s": max(o["ttft_s"]["p99"] for o in outs),
                    "tpot_p99_s": max(o["tpot_s"]["p99"] or 0.0 for o in outs),
                }
        out[name] = {"runs": runs, "checks": _checks(runs)}
    return out


def _checks(runs: dict) -> dict:
    flex, static, fifo = runs[FLEX], runs[STATIC], runs[FIFO]
    slo = DEFAULT_SLO.tpot_s
    knee = [r for r, s in static.items() if s["ttft_p99_s"] <= DEFAULT_SLO.ttft_s]
    knee_rate = knee[-1] if knee else next(iter(static))
    return {
        "goodput_ge_static_and_fifo": {
            r: flex[r]["goodput"] >= 0.995 * max(static[r]["goodput"], fifo[r]["goodput"]) for r in flex
        },
        "tpot_p99_within_slo_where_static_is": {
            r: flex[r]["tpot_p99_s"] <= slo for r in flex if static[r]["tpot_p99_s"] <= slo
        },
        "knee_rate": knee_rate,
        "ttft_p50_change_at_knee_pct": _pct(flex[knee_rate]["ttft_p50_s"], static[knee_rate]["ttft_p50_s"]),
    }


def sensitivity(rates: list[float], seconds: float, prefill_npus: int, quick: bool) -> list[dict]:
    rows = []
    for name, chip in sweeps(CHIP)[: 3 if quick else None]:  # the figures nobody has measured, as bench fidelity
        runs = sweep(rates, seconds, prefill_npus, chip, labels=(STATIC, FLEX, DISAGG))
        rows.append({"variant": name, "runs": runs, "compare": compare(runs)})
    return rows


def fold_check(rate: float, seconds: float) -> dict:
    """The simulator's layer folding (fold 28: one task per kernel for all layers) against none, on one chip."""
    out = {}
    for label in (STATIC, FLEX, "fifo co-location"):
        pair = {}
        for fold in (1, 28):
            pair[str(fold)] = _summary(simulate(spec(label, npus=1, fold=fold), _workload(rate, 1, seconds)))
        out[label] = pair
    return out


def scale(seconds: float, npus: int, rate_per_npu: float) -> dict:
    """A long run of a big deployment: how long the simulator takes, for how much modeled time."""
    out = simulate(spec(FLEX, npus), _workload(rate_per_npu, npus, seconds), jobs=2)
    s = _summary(out)
    return s | {
        "npus": npus,
        "modeled_s": out.duration_s,
        "npu_seconds_per_wall_second": npus * out.duration_s / out.wall_s,
    }


def timelines(rate: float, seconds: float, window: tuple[float, float]) -> dict:
    """Cube cores held per phase on chip 0, in 1 ms bins over `window` (modeled s), per co-location policy; layers
    not folded, so every kernel shows."""
    out = {}
    for label in ("fifo co-location", STATIC, FLEX):
        outcome = simulate(spec(label, npus=1, fold=1), _workload(rate, 1, seconds), timeline=True)
        t0, t1 = window
        bins = np.arange(t0, t1, 1e-3)
        held = {}
        for phase in ("prefill", "decode"):
            cores = np.zeros(len(bins))
            for p, start, end, cube, _ in outcome.timeline:
                if p.value != phase or end <= t0 or start >= t1:
                    continue
                lo, hi = np.searchsorted(bins, [start, end])
                cores[max(lo - 1, 0) : hi] += cube  # a kernel holds its cores for every bin it touches
            held[phase] = np.minimum(cores, CHIP.ai_cores).tolist()
        out[label] = {"t0": t0, "bin_s": 1e-3, "cube_cores": held}
    return out


def live(quick: bool) -> dict:
    """Each setup through the daemon on one physical NPU (disaggregation: one prefill and one decode NPU): the same
    engines in real processes, paced in real time at SERVE_TIME_SCALE."""
    import trio

    from tools.bench_serve import SERVE_TIME_SCALE, _serve_and_load

    rates, n = ([4.0], 8) if quick else ([4.0, 8.0], 24)
    lengths = Lengths(CONVERSATION.prompt, Length(211, 163, 64))  # outputs capped to keep the run in minutes
    runs = {}
    for label, (deployment, policy, options) in SETUPS.items():
        serve = ServeSpec.for_model(MODEL, time_scale=SERVE_TIME_SCALE, policy=policy, policy_options=dict(options))
        for rate, run in zip(
            rates, trio.run(_serve_and_load, deployment, serve, rates, n, lengths, DEFAULT_SLO).values(), strict=True
        ):
            runs[f"{label} @ {rate:g}/s"] = {k: v for k, v in run.items() if k != "requests"}
    return {"time_scale": SERVE_TIME_SCALE, "requests_per_rate": n, "runs": runs}


def run(quick: bool = False) -> dict:
    if quick:
        rates, seconds, hi, trace_rates, seeds = [3.0, 6.0], 30.0, 6.0, [2.0, 4.0, 6.0], 2
    else:
        rates, seconds, hi, trace_rates, seeds = (
            [float(r) for r in range(1, 11)],
            120.0,
            8.0,
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0],
            3,
        )
    ratio = pd_ratio(hi, seconds)
    prefill_npus = int(ratio["chosen"].split(":")[0])
    runs = sweep(rates, seconds, prefill_npus)
    near = _near_saturation(runs)
    result = {
        "model": MODEL,
        "chip": CHIP.name,
        "npus": NPUS,
        "trace": "Azure conversation (prompt 1155±1109, output 211±163)",
        "slo": {"ttft_s": DEFAULT_SLO.ttft_s, "tpot_s": DEFAULT_SLO.tpot_s},
        "host_ms": HOST_MS,
        "flex_target_ms": make_policy("flex").target * 1e3,
        "seconds_per_rate": seconds,
        "pd_ratio": ratio,
        "runs": runs,
        "compare": compare(runs),
        "near_static_saturation": near,
        "traces": traces(trace_rates, seconds, seeds),
        "sensitivity": sensitivity(sorted({near, rates[len(rates) // 2]}), seconds, prefill_npus, quick),
        "fold_check": fold_check(float(near), seconds / 2),
        "timeline": timelines(float(near), 15.0, (10.0, 11.0)),
        "live": live(quick),
    }
    if not quick:
        result["scale"] = scale(3600.0, 16, 3.0)
    plot(result, "bench-pd")
    result["plots"] = [f"bench-pd-{name}.png" for name in ("latency", "goodput", "timeline")]
    return result


def _near_saturation(runs: dict) -> float:
    """The highest rate at which static co-location still meets the TTFT SLO at p99: past it, its prefill queue
    grows and so does TTFT."""
    ok = [float(r) for r, s in runs[STATIC].items() if s["ttft_s"]["p99"] <= DEFAULT_SLO.ttft_s]
    return max(ok) if ok else float(next(iter(runs[STATIC])))


# -- the report ----------------------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f} %"


def _runs_table(runs: dict) -> str:
    rows = [
        (
            "setup",
            "rate/chip",
            "req/s",
            "tok/s held",
            "goodput",
            "TTFT mean",
            "TTFT p99",
            "TPOT mean",
            "TPOT p99",
            "wall s",
        )
    ]
    for label, by_rate in runs.items():
        for rate, s in by_rate.items():
            rows.append(
                (
                    label,
                    rate,
                    f"{s['request_throughput']:.2f}",
                    f"{s.get('sustained_tokens_per_s', 0):.0f}",
                    f"{s['goodput']:.2f}",
                    _ms(s["ttft_s"]["mean"]),
                    _ms(s["ttft_s"]["p99"]),
                    _ms(s["tpot_s"]["mean"]),
                    _ms(s["tpot_s"]["p99"]),
                    f"{s['wall_s']:.1f}",
                )
            )
    return plain(rows)


def _compare_table(cmp: dict) -> str:
    rows = [
        ("rate/chip", "TTFT mean", "TTFT p99", "TPOT mean", "throughput", "goodput x", "vs disagg thr", "goodput x")
    ]
    for rate, c in cmp.items():
        rows.append(
            (
                rate,
                _signed(c["ttft_mean_change_pct"]),
                _signed(c["ttft_p99_change_pct"]),
                _signed(c["tpot_mean_change_pct"]),
                _signed(c["throughput_change_pct"]),
                f"{c['goodput_ratio']:.2f}",
                _signed(c["vs_disagg_throughput_pct"]),
                f"{c['vs_disagg_goodput_ratio']:.2f}",
            )
        )
    return plain(rows)


def render(r: dict) -> str:
    ratio = r["pd_ratio"]
    tried = ", ".join(
        f"{k}: {v['request_throughput']:.2f} req/s, goodput {v['goodput']:.2f}" for k, v in ratio["tried"].items()
    )
    out = [
        f"{r['model']} on {r['npus']} x {r['chip']} (simulated), {r['trace']}, SLO TTFT <= {r['slo']['ttft_s']} s and "
        f"TPOT <= {r['slo']['tpot_s'] * 1e3:.0f} ms; host {r['host_ms']} ms per step; flex TPOT target "
        f"{r['flex_target_ms']} ms; {r['seconds_per_rate']:.0f} s of arrivals per rate; latencies in ms",
        f"disaggregation P:D chosen {ratio['chosen']} at {ratio['rate_per_npu']:g} req/s per chip ({tried})",
        "",
        _runs_table(r["runs"]),
        "",
        "flex co-location vs static co-location (changes: negative TTFT is better), and vs static disaggregation:",
        _compare_table(r["compare"]),
        f"static co-location's last rate before saturation: {r['near_static_saturation']:g} req/s per chip",
        "",
        "Across traces (co-location, mean goodput and worst TPOT p99 over seeds; TTFT p50 in ms):",
    ]
    for name, t in r["traces"].items():
        c = t["checks"]
        rows = [("rate/chip", *(f"{lab.split()[0]} {k}" for lab in t["runs"] for k in ("goodput", "TTFT", "TPOT p99")))]
        for rate in t["runs"][FLEX]:
            cells = []
            for label in t["runs"]:
                s = t["runs"][label][rate]
                cells += [f"{s['goodput']:.2f}", _ms(s["ttft_p50_s"]), _ms(s["tpot_p99_s"])]
            rows.append((rate, *cells))
        good = [k for k, ok in c["goodput_ge_static_and_fifo"].items() if not ok]
        tpot = [k for k, ok in c["tpot_p99_within_slo_where_static_is"].items() if not ok]
        out += [
            f"  {name}",
            "  " + plain(rows).replace("\n", "\n  "),
            f"  flex goodput >= static and fifo: {'every rate' if not good else 'not at ' + ', '.join(good)}; "
            f"TPOT p99 within the SLO where static's is: {'yes' if not tpot else 'not at ' + ', '.join(tpot)}; "
            f"TTFT p50 at static's knee ({c['knee_rate']}/s): {_signed(c['ttft_p50_change_at_knee_pct'])}",
        ]
    out += [
        "",
        "Across the device-model constants nobody has measured (flex vs static co-location, vs disaggregation):",
    ]
    for v in r["sensitivity"]:
        out += [f"  {v['variant']}", "  " + _compare_table(v["compare"]).replace("\n", "\n  ")]
    fold = r["fold_check"]
    out += ["", "simulator layer folding (one chip, fold 1 vs 28): TTFT / TPOT means in ms"]
    for label, pair in fold.items():
        a, b = pair["1"], pair["28"]
        out.append(
            f"  {label}: {_ms(a['ttft_s']['mean'])} / {_ms(a['tpot_s']['mean'])} vs "
            f"{_ms(b['ttft_s']['mean'])} / {_ms(b['tpot_s']['mean'])}; wall {a['wall_s']:.1f} s vs {b['wall_s']:.1f} s"
        )
    if "scale" in r:
        s = r["scale"]
        out.append(
            f"\nscale: {s['npus']} NPUs, {s['modeled_s']:.0f} modeled s, {s['completed']} requests in "
            f"{s['wall_s']:.0f} s wall ({s['npu_seconds_per_wall_second']:.0f} NPU-seconds per second, 2 processes)"
        )
    lv = r["live"]
    out += [
        "",
        f"Live through the daemon (one chip per setup, two disaggregated; time_scale {lv['time_scale']}, "
        f"{lv['requests_per_rate']} requests per rate, outputs capped at 64; rates per modeled s):",
        _runs_table({k: {"": v | {"wall_s": 0.0}} for k, v in lv["runs"].items()}),
        "",
        "plots: " + ", ".join(r["plots"]),
    ]
    return "\n".join(out)


def plot(r: dict, prefix: str) -> None:
    """TTFT and TPOT vs rate, goodput vs rate, and the timeline of each phase's cores; bare Figures (no pyplot)."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    for ax, (key, stat, title) in zip(
        fig.subplots(1, 3),
        (("ttft_s", "mean", "TTFT mean"), ("ttft_s", "p99", "TTFT p99"), ("tpot_s", "mean", "TPOT mean")),
        strict=True,
    ):
        for label, by_rate in r["runs"].items():
            rates = [float(x) for x in by_rate]
            ax.plot(
                rates, [s[key][stat] * 1e3 if s[key][stat] else np.nan for s in by_rate.values()], "o-", label=label
            )
        limit = r["slo"][key] * 1e3
        ax.axhline(limit, color="grey", linestyle="--", label="SLO")
        ax.set(title=title, xlabel="requests/s per chip", ylabel="ms", yscale="log" if key == "ttft_s" else "linear")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.savefig(f"{prefix}-latency.png", dpi=100)

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for label, by_rate in r["runs"].items():
        ax.plot([float(x) for x in by_rate], [s["goodput"] / r["npus"] for s in by_rate.values()], "o-", label=label)
    ax.set(
        title="goodput (TTFT <= 2 s, TPOT <= 50 ms)", xlabel="requests/s per chip", ylabel="good requests/s per chip"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(f"{prefix}-goodput.png", dpi=100)

    tl = r["timeline"]
    fig = Figure(figsize=(12, 2.6 * len(tl)), layout="constrained")
    for ax, (label, t) in zip(fig.subplots(len(tl), 1, sharex=True), tl.items(), strict=True):
        held = t["cube_cores"]
        x = t["t0"] + np.arange(len(held["prefill"])) * t["bin_s"]
        ax.stackplot(x, held["prefill"], held["decode"], labels=["prefill", "decode"], step="post")
        ax.set(title=f"{label}: AI cores held on one chip", ylabel="cores", ylim=(0, CHIP.ai_cores))
        ax.legend(loc="upper right", fontsize=7)
    fig.axes[-1].set_xlabel("modeled s")
    fig.savefig(f"{prefix}-timeline.png", dpi=100)
