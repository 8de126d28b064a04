"""Run a model through pyACL (`import acl`): greedy generation for byte-level prompts, or timed decode steps.
Each command prints one JSON line.

    python -m workloads.generate tokens --model tiny --seed 0 --prompt hello --prompt "hi there" --steps 4
    python -m workloads.generate decode --model qwen2.5-7b --batch 32 --context 1024 --steps 3   # timing mode

Under `vdevctl run` it reaches a daemon's virtual NPU; with FLEXNPU_DIRECT=1 the emulated NPUs run in-process.
"""

from __future__ import annotations

import json

import click

from workloads.model import CacheConfig, ModelConfig, model_config

BLOCK_SIZE = 16


def block_tables(lengths: list[int], block_size: int) -> list[list[int]]:
    """Each request its own run of blocks, enough for `length` tokens: the simplest allocation."""
    tables, first = [], 0
    for length in lengths:
        count = -(-length // block_size)
        tables.append(list(range(first, first + count)))
        first += count
    return tables


def generate(
    model, prompts: list[list[int]], steps: int, tables: list[list[int]] | None = None, chunk: int = 0
) -> list[list[int]]:
    """Greedy: a prefill of every prompt (in chunks of at most `chunk` tokens a step, if given), then `steps` batched
    decode steps. Returns each request's new tokens. tables: each request's blocks (default: runs of blocks in
    request order)."""
    lengths = [len(p) for p in prompts]
    tables = tables or block_tables([n + steps for n in lengths], model.cache.block_size)
    done = [0] * len(prompts)  # prompt tokens in the cache
    out: list[list[int]] = [[] for _ in prompts]
    while active := [i for i, p in enumerate(prompts) if done[i] < len(p)]:
        pieces = [prompts[i][done[i] : done[i] + (chunk or len(prompts[i]))] for i in active]
        tokens = model.prefill(pieces, [tables[i] for i in active], [done[i] for i in active])
        for i, piece, token in zip(active, pieces, tokens, strict=True):
            done[i] += len(piece)
            out[i] = [token]  # the token after its last chunk is the first token
    for _ in range(steps):
        lengths = [n + 1 for n in lengths]
        for request, token in zip(out, model.decode([r[-1] for r in out], lengths, tables), strict=True):
            request.append(token)
    return out


def _config(model: str, hf_config: str | None) -> ModelConfig:
    return ModelConfig.from_hf(hf_config) if hf_config else model_config(model)


@click.group()
def main() -> None:
    pass


@main.command()
@click.option("--model", default="tiny", show_default=True, help="a built-in model")
@click.option("--hf-config", type=click.Path(exists=True, dir_okay=False), help="a Hugging Face config.json instead")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="safetensors weights (HF names)")
@click.option("--seed", type=int, default=0, show_default=True, help="random weights from this seed, if no checkpoint")
@click.option("--prompt", "prompts", multiple=True, required=True, help="a prompt (its UTF-8 bytes are its tokens)")
@click.option("--steps", type=int, default=4, show_default=True, help="decode steps after the prefill")
@click.option("--device", type=int, default=0, show_default=True)
def tokens(model, hf_config, checkpoint, seed, prompts, steps, device) -> None:
    """Greedy tokens for byte-level prompts (numeric mode)."""
    import acl
    from workloads.acl_executor import AclModel, check
    from workloads.weights import device_weights, load_checkpoint, random_checkpoint

    config = _config(model, hf_config)
    encoded = [list(p.encode()) for p in prompts]
    hf = load_checkpoint(config, checkpoint) if checkpoint else random_checkpoint(config, seed)
    cache = CacheConfig(sum(len(b) for b in block_tables([len(p) + steps for p in encoded], BLOCK_SIZE)), BLOCK_SIZE)
    check(acl.init(), "init")
    runner = AclModel(config, cache, device_weights(config, hf), device)
    out = generate(runner, encoded, steps)
    runner.close()
    check(acl.finalize(), "finalize")
    click.echo(json.dumps({"tokens": out}))


@main.command()
@click.option("--model", default="qwen2.5-7b", show_default=True, help="a built-in model")
@click.option("--hf-config", type=click.Path(exists=True, dir_okay=False), help="a Hugging Face config.json instead")
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--context", type=int, default=1024, show_default=True, help="each request's context length")
@click.option("--steps", type=int, default=3, show_default=True)
@click.option("--block-size", type=int, default=128, show_default=True)
@click.option("--device", type=int, default=0, show_default=True)
@click.option("--graph/--eager", default=False, show_default=True, help="replay a captured graph per step")
def decode(model, hf_config, batch, context, steps, block_size, device, graph) -> None:
    """Decode steps of a batch, weights allocated but not written (for an NPU in timing mode): host and device
    milliseconds per step."""
    import acl
    from workloads.acl_executor import AclModel, check

    config = _config(model, hf_config)
    tables = block_tables([context + steps] * batch, block_size)
    check(acl.init(), "init")
    cache = CacheConfig(sum(map(len, tables)) + 1, block_size)  # + a scratch block for graphs' padding
    runner = AclModel(config, cache, None, device, buckets=(batch,) if graph else (), max_context=context + steps)
    host, dev, issue = [], [], []
    for i in range(steps):
        runner.decode([0] * batch, [context + i] * batch, tables)
        host.append(runner.host_ms)
        dev.append(runner.device_ms)
        issue.append(runner.issue_ms)
    runner.close()
    check(acl.finalize(), "finalize")
    result = {"model": config.name, "batch": batch, "context": context, "graph": graph}
    click.echo(json.dumps(result | {"host_ms": host, "device_ms": dev, "issue_ms": issue}))


@main.command()
@click.option("--model", default="qwen2.5-7b", show_default=True, help="a built-in model")
@click.option("--prompt-len", type=int, default=1024, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True, help="prompts prefilled together")
@click.option("--block-size", type=int, default=128, show_default=True)
@click.option("--device", type=int, default=0, show_default=True)
def prefill(model, prompt_len, batch, block_size, device) -> None:
    """One prefill step of `batch` prompts, weights allocated but not written (an NPU in timing mode): host and
    device milliseconds, the device's being the step's time to first token."""
    import acl
    from workloads.acl_executor import AclModel, check

    config = model_config(model)
    tables = block_tables([prompt_len] * batch, block_size)
    check(acl.init(), "init")
    runner = AclModel(config, CacheConfig(sum(map(len, tables)), block_size), None, device)
    runner.prefill([[0] * prompt_len] * batch, tables)
    runner.close()
    check(acl.finalize(), "finalize")
    click.echo(
        json.dumps(
            {
                "model": config.name,
                "batch": batch,
                "prompt_len": prompt_len,
                "host_ms": runner.host_ms,
                "device_ms": runner.device_ms,
            }
        )
    )


if __name__ == "__main__":
    main()
