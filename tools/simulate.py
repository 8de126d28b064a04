"""`vdevctl simulate`: a serving deployment in virtual time (sim/), no daemon and no processes."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import click

from npu.profiles import PROFILES, profile
from scheduler.policies import POLICIES
from sim.cloudmatrix.costs import Sizes
from sim.cloudmatrix.deployment import SLO as CLOUDMATRIX_SLO
from sim.cloudmatrix.deployment import Deployment, Setup
from sim.cloudmatrix.imbalance import EPLB_MODES
from sim.run import Workload, simulate
from sim.serving import DEPLOYMENTS, SimSpec
from workloads import deepseek
from workloads.deepseek import DeepSeekConfig
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


def _model(value: str) -> ModelConfig | DeepSeekConfig:
    if value in BUILTIN:
        return model_config(value)
    if value in deepseek.BUILTIN:
        return deepseek.model_config(value)
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(
            f"{value!r} is neither a built-in model ({', '.join(BUILTIN)}) nor a config.json; DeepSeek-V3 "
            f"built-ins: {', '.join(deepseek.BUILTIN)}"
        )
    name = path.parent.name or path.stem
    try:
        if json.loads(path.read_text()).get("model_type") == "deepseek_v3":
            return DeepSeekConfig.from_hf(path, name=name)
        return ModelConfig.from_hf(path, name=name)
    except (ValueError, KeyError) as exc:
        raise click.BadParameter(f"{value}: {exc}") from None


def _deepseek(config: DeepSeekConfig, chip: str, deployment: str, npus: int, prefill_npus: int, policy: str, **opts):
    """A CloudMatrix-style deployment of a DeepSeek-V3-architecture model (sim/cloudmatrix): EP groups of dies."""
    if chip != "910C":
        raise ValueError(f"{config.name}: the supernode model is of 910C dies (CloudMatrix384); got --chip {chip}")
    if deployment not in ("disaggregated", "colocated"):
        raise ValueError(f"{config.name}: deployments are disaggregated and colocated, not {deployment}")
    ep = opts["ep"]
    if ep % 2:
        raise ValueError(f"--ep {ep}: an EP group is whole 910C NPUs (an even number of dies)")
    setup = Setup(mtp_acceptance=opts["mtp_acceptance"], eplb=opts["eplb"])
    sizes = Sizes(decode_batch=max(1, opts["decode_batch"] // 2))
    shape = {"colocated_group_npus": ep // 2} if deployment == "colocated" else {"decode_instance_npus": ep // 2}
    return Deployment(
        deployment,
        npus,
        prefill_npus or 224,
        policy=policy,
        sizes=sizes,
        setup=setup,
        config=config,
        **(shape if ep else {}),
    ).spec()


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
@click.option(
    "--decode-batch",
    type=click.IntRange(min=1),
    default=96,
    show_default=True,
    help="DeepSeek: requests per NPU a decode group runs at once.",
)
@click.option(
    "--ep",
    type=click.IntRange(min=0),
    default=0,
    help="DeepSeek: dies per decode EP group (colocated: per group; default 384, disaggregated 320).",
)
@click.option(
    "--mtp-acceptance",
    type=click.FloatRange(0, 1),
    default=0.7,
    show_default=True,
    help="DeepSeek: MTP drafts accepted.",
)
@click.option("--no-mtp", is_flag=True, help="DeepSeek: no multi-token prediction.")
@click.option(
    "--eplb", type=click.Choice(EPLB_MODES), default="default", show_default=True, help="DeepSeek: expert balancing."
)
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
    decode_batch,
    ep,
    mtp_acceptance,
    no_mtp,
    eplb,
    out,
) -> None:
    """Simulate serving in virtual time: the real policies, engine, timing model, op costs and batching core.
    A DeepSeek-V3/R1 model runs on a CloudMatrix384-style supernode of 910C dies (sim/cloudmatrix)."""
    config = _model(model)
    slo = DEFAULT_SLO
    try:
        if isinstance(config, DeepSeekConfig):
            slo = CLOUDMATRIX_SLO
            accept = None if no_mtp else mtp_acceptance
            spec = _deepseek(
                config,
                chip,
                deployment,
                npus,
                prefill_npus,
                policy,
                ep=ep,
                mtp_acceptance=accept,
                eplb=eplb,
                decode_batch=decode_batch,
            )
            spec = replace(spec, keep_itl=out is not None)
        else:
            spec = _dense_spec(config, chip, deployment, npus, prefill_npus, policy, options, chunk, host_ms, fold, out)
        total = rate * npus
        count = max(1, round(total * duration)) if math.isfinite(total) else max(1, round(duration))
        outcome = simulate(spec, Workload(_lengths(lengths), total, count, seed), jobs=jobs)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    summary = outcome.summary(slo)
    label = f"{deployment} {spec.serve.policy} x{npus}"
    rate_out = total if math.isfinite(total) else "inf"  # as the load generator writes it: JSON has no infinity
    run = summary | {"settings": {"rate": rate_out, "num_requests": count, "slo": slo.__dict__}}
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


def _dense_spec(config, chip, deployment, npus, prefill_npus, policy, options, chunk, host_ms, fold, out) -> SimSpec:
    """A dense model's deployment: one engine (or a prefill and a decode engine) per chip."""
    return SimSpec(
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
