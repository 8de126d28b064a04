"""`vdevctl bench cloudmatrix`: DeepSeek-R1 on a CloudMatrix384-scale deployment, in the simulator (sim/cloudmatrix).

1. Calibration: the published CloudMatrix-Infer figures (arXiv 2506.12708) beside the model's, with ratios, each
   row marked fitted (a constant was chosen to meet it) or predicted.
2. Predictions at points nobody published (other lengths, batches, EPLB), for checking against later figures.
3. The comparison: flex co-location on 384 NPUs against the best static PD disaggregation (its P:D split swept),
   throughput at the SLO, for a balanced and a prompt-heavy workload; then the gain across the constants nobody
   measured (UB latency, expert imbalance, MTP acceptance).
4. Speed: the wall time of 60 modeled seconds of the 384-NPU deployment.
`--decode-point IN,OUT,B` and `--prefill-point IN` print one steady-state row instead and write its JSON.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from sim.cloudmatrix import experiment
from sim.cloudmatrix.deployment import SLO, Deployment, Setup, decode_point, prefill_point
from sim.cloudmatrix.imbalance import EPLB_MODES
from sim.cloudmatrix.network import PUBLISHED, PUBLISHED_TOKENS, Network
from workloads.deepseek import DEEPSEEK_R1
from workloads.tables import plain

NPUS = 384
PERFECT = Setup(eplb="perfect")
NO_MTP = Setup(mtp_acceptance=None)
# (what, published value, unit, source, fitted?, how the model's value is computed)
CALIBRATION = [
    (
        "decode 4K/256, 96/NPU, MTP: TPOT",
        49.4,
        "ms",
        "fit: mla.MLA_DECODE_EFF",
        lambda: decode_point(4096, 256, 96)["tpot_ms"],
    ),
    (
        "decode 4K/256, 96/NPU, MTP: tokens/s/NPU",
        1943,
        "tok/s",
        "follows (B / TPOT)",
        lambda: decode_point(4096, 256, 96)["tokens_per_s_per_npu"],
    ),
    (
        "decode 4K/256, 24/NPU, MTP: TPOT",
        24.6,
        "ms",
        "fit: GRAPH_LAUNCH_S",
        lambda: decode_point(4096, 256, 24)["tpot_ms"],
    ),
    (
        "decode 4K/256, 24/NPU, MTP: tokens/s/NPU",
        974,
        "tok/s",
        "follows (B / TPOT)",
        lambda: decode_point(4096, 256, 24)["tokens_per_s_per_npu"],
    ),
    (
        "prefill 4K, perfect EPLB: tokens/s/NPU",
        6688,
        "tok/s",
        "fit: quant.INT8_EFF",
        lambda: prefill_point(4096, PERFECT)["tokens_per_s_per_npu"],
    ),
    ("decode layer, 96/NPU, no MTP", 874, "us", "predicted", lambda: decode_point(4096, 256, 96, NO_MTP)["layer_us"]),
    ("decode layer, 96/NPU, MTP", 1260, "us", "predicted", lambda: decode_point(4096, 256, 96)["layer_us"]),
    *(
        (
            f"{op} EP{ep}, {PUBLISHED_TOKENS} tokens/rank",
            published * 1e6,
            "us",
            "fit: network.py (2 points per op)",
            (lambda op=op, ep=ep: _all_to_all(op, ep) * 1e6),
        )
        for op, points in PUBLISHED.items()
        for ep, published in points.items()
    ),
]
PREDICTIONS = [  # (what, how): not published; printed for later checking
    ("decode 2K/2K, 32/NPU: TPOT ms", lambda: decode_point(2048, 2048, 32)["tpot_ms"]),
    ("decode 2K/2K, 64/NPU: TPOT ms", lambda: decode_point(2048, 2048, 64)["tpot_ms"]),
    ("decode 1K/1K, 128/NPU: TPOT ms", lambda: decode_point(1024, 1024, 128)["tpot_ms"]),
    ("decode 8K/512, 48/NPU: TPOT ms", lambda: decode_point(8192, 512, 48)["tpot_ms"]),
    ("decode 4K/256, 96/NPU, no MTP: TPOT ms", lambda: decode_point(4096, 256, 96, NO_MTP)["tpot_ms"]),
    ("decode 4K/256, 8/NPU: TPOT ms (the 15 ms point's floor)", lambda: decode_point(4096, 256, 8)["tpot_ms"]),
    ("prefill 1K, perfect EPLB: tok/s/NPU", lambda: prefill_point(1024, PERFECT)["tokens_per_s_per_npu"]),
    ("prefill 2K, perfect EPLB: tok/s/NPU", lambda: prefill_point(2048, PERFECT)["tokens_per_s_per_npu"]),
    ("prefill 8K, perfect EPLB: tok/s/NPU", lambda: prefill_point(8192, PERFECT)["tokens_per_s_per_npu"]),
    ("prefill 4K, default EPLB: tok/s/NPU", lambda: prefill_point(4096)["tokens_per_s_per_npu"]),
]


def _all_to_all(op: str, ep: int) -> float:
    row = {"dispatch": 7168 + 4, "combine": 7168 * 2}[op]
    return Network().all_to_all(op, ep, PUBLISHED_TOKENS * DEEPSEEK_R1.num_experts_per_tok, row)


def calibration() -> list[dict]:
    rows = []
    for what, published, unit, source, model in CALIBRATION:
        value = model()
        rows.append({"what": what, "published": published, "model": value, "unit": unit, "source": source})
    return rows


def predictions() -> list[dict]:
    return [{"what": what, "model": model()} for what, model in PREDICTIONS]


def run(quick: bool = False, engine: str = "processes", address: str | None = None) -> dict:
    # Full: 30 s of arrivals per run (requests last 5-15 s), three bisection steps, the two best static splits;
    # quick: a smoke run of a few minutes, not for figures.
    search = experiment.Search(seconds=10, steps=1) if quick else experiment.Search()
    comparison = experiment.compare(
        NPUS, search=search, splits_simulated=1 if quick else experiment.SPLITS, engine=engine, address=address
    )
    worst = max(comparison["comparison"], key=lambda c: c["gain"] or 0.0)  # the workload the gain is largest on
    best = Deployment("disaggregated", NPUS, worst["best_static_prefill_npus"])
    constants = {"skew": experiment.SENSITIVITY["skew"][:2]} if quick else experiment.SENSITIVITY
    sensitivity_search = replace(search, steps=max(1, search.steps - 1))
    return {
        "slo": {"ttft_s": SLO.ttft_s, "tpot_s": SLO.tpot_s, "attainment": experiment.ATTAINMENT},
        "search": search.__dict__,
        "calibration": calibration(),
        "predictions": predictions(),
        **comparison,
        "sensitivity": {
            "workload": worst["workload"],
            "static": worst["best_static"],
            "rows": experiment.sensitivity(
                NPUS, worst["workload"], best, sensitivity_search, constants, engine, address
            ),
        },
        "speed": experiment.speed(10.0 if quick else 60.0),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f} %"


def render(r: dict) -> str:
    out = ["DeepSeek-R1 on CloudMatrix384, simulated (sim/cloudmatrix)", ""]
    rows = [("published figure (arXiv 2506.12708)", "published", "model", "ratio", "source of the model's value")]
    for c in r["calibration"]:
        rows.append(
            (
                c["what"],
                f"{c['published']:g} {c['unit']}",
                f"{c['model']:.1f} {c['unit']}",
                f"{c['model'] / c['published']:.3f}",
                c["source"],
            )
        )
    out += ["Calibration (within +-15 % is the target; 'fit' rows were met by choosing a constant)", plain(rows), ""]
    out += [
        "Predictions (unpublished points)",
        plain([("point", "model")] + [(p["what"], f"{p['model']:.1f}") for p in r["predictions"]]),
        "",
    ]
    slo = r["slo"]
    rows = [("workload", "in/out", "best static split", "static tok/s", "flex tok/s", "gain")]
    for c in r["comparison"]:
        rows.append(
            (
                c["workload"],
                f"{c['prompt_tokens']:.0f}/{c['output_tokens']:.0f}",
                c["best_static"],
                f"{c['static_disaggregation_tok_s']:.0f}",
                f"{c['flex_colocation_tok_s']:.0f}",
                _pct(c["gain"]),
            )
        )
    out += [
        f"Flex co-location vs static PD disaggregation, {NPUS} NPUs: output tokens/s at the highest rate where "
        f"{slo['attainment']:.0%} of requests meet TTFT <= {slo['ttft_s']:g} s and TPOT <= {slo['tpot_s'] * 1e3:g} ms "
        "(the paper: +5.15 % and +26.33 %)",
        plain(rows),
        "",
    ]
    for c in r["comparison"]:
        runs = [("deployment", "rate", "attained", "tok/s", "TTFT p90 s", "TPOT p90 ms")]
        for label, res in [("flex co-location", c["flex_run"]), *c["static_runs"].items()]:
            for run in res["runs"]:
                runs.append(
                    (
                        label,
                        f"{run['rate']:.0f}",
                        f"{run['attainment']:.0%}",
                        f"{run['tokens_per_s']:.0f}",
                        "-" if run["ttft_p90_s"] is None else f"{run['ttft_p90_s']:.2f}",
                        "-" if run["tpot_p90_ms"] is None else f"{run['tpot_p90_ms']:.1f}",
                    )
                )
        out += [f"runs, {c['workload']}", plain(runs), ""]
    s = r["sensitivity"]
    rows = [("constant", "value", "static tok/s", "flex tok/s", "gain")]
    for row in s["rows"]:
        rows.append(
            (
                row["constant"],
                f"{row['value']:g}",
                f"{row['static_disaggregation_tok_s']:.0f}",
                f"{row['flex_colocation_tok_s']:.0f}",
                _pct(row["gain"]),
            )
        )
    out += [f"Sensitivity of the gain ({s['workload']}, against {s['static']}; defaults above)", plain(rows), ""]
    sp = r["speed"]
    out.append(
        f"Speed: {sp['arrivals_s']:.0f} s of arrivals ({sp['modeled_s']:.0f} modeled s to drain) of {NPUS} NPUs in "
        f"{sp['wall_s']:.0f} s wall (target: 60 s in <= 120 s)"
    )
    return "\n".join(out)


def plot(r: dict, path: Path) -> None:
    """Throughput vs offered rate per deployment and workload, with the SLO attainment marked; a bare Figure."""
    from matplotlib.figure import Figure

    comparisons = r["comparison"]
    fig = Figure(figsize=(6 * len(comparisons), 4), layout="constrained")
    for ax, c in zip(fig.subplots(1, len(comparisons), squeeze=False)[0], comparisons, strict=True):
        for label, res in [("flex co-location", c["flex_run"]), *c["static_runs"].items()]:
            runs = sorted(res["runs"], key=lambda x: x["rate"])
            ax.plot([x["rate"] for x in runs], [x["tokens_per_s"] for x in runs], "o-", label=label)
            ok = [x for x in runs if x["attainment"] >= experiment.ATTAINMENT]
            ax.plot([x["rate"] for x in ok], [x["tokens_per_s"] for x in ok], "k.", markersize=4)
        ax.set(title=f"{c['workload']}: gain {_pct(c['gain'])}", xlabel="requests/s offered", ylabel="output tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def _point(value: str, count: int, what: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(x) for x in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != count or min(parts) <= 0:
        raise click.BadParameter(f"{value!r}: {what}")
    return parts


@click.command("cloudmatrix")
@click.option("--out", type=click.Path(path_type=Path), default="bench-cloudmatrix.json", show_default=True)
@click.option("--quick", is_flag=True, help="A smoke run of a few minutes (short runs, few rates: not for figures).")
@click.option("--decode-point", "decode_point_", help="IN,OUT,B: steady-state decode of B requests per NPU; one row.")
@click.option(
    "--prefill-point",
    "prefill_point_",
    type=click.IntRange(min=1),
    help="IN: steady-state prefill of IN-token prompts.",
)
@click.option("--eplb", type=click.Choice(EPLB_MODES), default="default", show_default=True)
@click.option("--no-mtp", is_flag=True, help="Points: decode without multi-token prediction.")
@click.option(
    "--engine",
    type=click.Choice(experiment.ENGINES),
    default="processes",
    show_default=True,
    help="Where sweep runs go: local processes, or Dask (pip install 'flexnpu[cluster]').",
)
@click.option("--address", help="engine dask: the scheduler's address (default: a local cluster).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Also draw throughput vs rate here (PNG).")
def command(out, quick, decode_point_, prefill_point_, eplb, no_mtp, engine, address, plot_path) -> None:
    """DeepSeek-R1 on a CloudMatrix384-scale deployment: calibration, flex co-location vs static disaggregation."""
    setup = Setup(eplb=eplb, mtp_acceptance=None if no_mtp else 0.7)
    if decode_point_ or prefill_point_:
        if decode_point_:
            prompt, output, per_npu = _point(decode_point_, 3, "use IN,OUT,B (tokens in, tokens out, requests/NPU)")
            p = decode_point(prompt, output, per_npu, setup)
            result = {"tpot_ms": p["tpot_ms"], "tokens_per_s_per_npu": p["tokens_per_s_per_npu"]}
            label = f"decode {prompt}/{output}, {per_npu}/NPU, eplb {eplb}{'' if no_mtp else ', MTP'}"
        else:
            result = {"tokens_per_s_per_npu": prefill_point(prefill_point_, setup)["tokens_per_s_per_npu"]}
            label = f"prefill {prefill_point_}, eplb {eplb}"
        rows = [("point", *result)] + [(label, *(f"{v:.1f}" for v in result.values()))]
        click.echo(plain(rows))
    else:
        result = run(quick, engine, address)
        click.echo(render(result))
        if plot_path is not None:
            plot(result, plot_path)
            click.echo(f"drew {plot_path}")
    out.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(f"\nwrote {out}")
