"""`vdevctl simulate`: a serving deployment in virtual time (sim/), no daemon and no processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from npu.profiles import PROFILES, profile
from scheduler.policies import POLICIES
from sim.run import Workload, simulate
from sim.serving import DEPLOYMENTS, SimSpec
from workloads.loadgen import render
from workloads.model import BUILTIN, ModelConfig, model_config
from workloads.spec import ServeSpec
from workloads.traffic import CODE, CONVERSATION, DEFAULT_SLO, Lengths

TRACES = {"conversation": CONVERSATION, "code": CODE}


def _lengths(value: str) -> Lengths:
    if value in TRACES:
        return TRACES[value]
    try:
        prompt, output = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use {' or '.join(TRACES)}, or PROMPT,OUTPUT token counts") from None
    return Lengths.fixed(prompt, output)


def _model(value: str) -> ModelConfig:
    if value in BUILTIN:
        return model_config(value)
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"{value!r} is neither a built-in model ({', '.join(BUILTIN)}) nor a config.json")
    try:
        return ModelConfig.from_hf(path, name=path.parent.name or path.stem)
    except (ValueError, KeyError) as exc:
        raise click.BadParameter(f"{value}: {exc}") from None


def _options(values: tuple[str, ...]) -> dict[str, float]:
    pairs = []
    for value in values:
        key, _, number = value.partition("=")
        try:
            pairs.append((key, int(number) if number.strip().lstrip("-").isdigit() else float(number)))
        except ValueError:
            raise click.BadParameter(f"{value!r}: a policy option is NAME=NUMBER, e.g. tpot_target_ms=45") from None
    return dict(pairs)


@click.command()
@click.option("--model", default="qwen2.5-7b", show_default=True, help="A built-in model or a HF config.json.")
@click.option("--chip", type=click.Choice(list(PROFILES)), default="910B2", show_default=True)
@click.option("--deployment", type=click.Choice(DEPLOYMENTS), default="colocated", show_default=True)
@click.option("--npus", type=click.IntRange(min=1), default=1, show_default=True, help="Physical NPUs.")
@click.option("--prefill-npus", type=int, default=0, help="disaggregated: NPUs of prefill engines (default half).")
@click.option("--policy", type=click.Choice(list(POLICIES)), default="flex", show_default=True)
@click.option("--option", "options", multiple=True, help="A policy option NAME=NUMBER (repeatable).")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=4.0,
    show_default=True,
    help="Requests per second per NPU (inf: a burst).",
)
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds of arrivals (modeled).")
@click.option("--lengths", default="conversation", show_default=True, help="conversation, code, or PROMPT,OUTPUT.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--host-ms", type=float, default=1.0, show_default=True, help="Serving work per decode step, modeled.")
@click.option(
    "--chunk",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Chunked prefill: prompt tokens per prefill step (vLLM's max_num_batched_tokens); 0: whole prompts.",
)
@click.option("--fold", type=int, default=1, show_default=True, help="Layers per simulated task (a divisor of them).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Processes (shards of NPUs).")
@click.option("--json", "out", type=click.Path(path_type=Path), help="Also write the results (per request) here.")
def command(
    model,
    chip,
    deployment,
    npus,
    prefill_npus,
    policy,
    options,
    rate,
    duration,
    lengths,
    seed,
    host_ms,
    chunk,
    fold,
    jobs,
    out,
) -> None:
    """Simulate serving in virtual time: the real policies, engine, timing model, op costs and batching core."""
    config = _model(model)
    try:
        spec = SimSpec(
            model=config,
            chip=profile(chip),
            deployment=deployment,
            npus=npus,
            prefill_npus=prefill_npus,
            serve=ServeSpec.for_model(
                config, policy=policy, policy_options=_options(options), max_num_batched_tokens=chunk
            ),
            host_ms=host_ms,
            fold=fold,
            keep_itl=out is not None,
        )
        total = rate * npus
        count = max(1, round(total * duration)) if math.isfinite(total) else max(1, round(duration))
        outcome = simulate(spec, Workload(_lengths(lengths), total, count, seed), jobs=jobs)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    summary = outcome.summary(DEFAULT_SLO)
    label = f"{deployment} {policy} x{npus}"
    rate_out = total if math.isfinite(total) else "inf"  # as the load generator writes it: JSON has no infinity
    run = summary | {"settings": {"rate": rate_out, "num_requests": count, "slo": DEFAULT_SLO.__dict__}}
    click.echo(render({label: run}))
    click.echo(
        f"{outcome.duration_s:.1f} modeled s in {outcome.wall_s:.1f} s wall "
        f"({npus * outcome.duration_s / max(outcome.wall_s, 1e-9):.0f} NPU-seconds per second); "
        f"{summary['sustained_tokens_per_s']:.0f} output tokens/s sustained while requests arrived"
    )
    if out is not None:
        requests = [r.__dict__ for r in outcome.results]
        out.write_text(json.dumps(run | {"requests": requests}, indent=1) + "\n")
        click.echo(f"wrote {out}")
