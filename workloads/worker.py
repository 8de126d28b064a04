"""One serving engine process: it runs the steps a coordinator (workloads/deploy.py) plans, for one model on one
NPU, through pyACL alone — started with the shim on its path, as `vdevctl run` starts any program.

Protocol: JSON lines, one request on stdin, one answer on stdout, in order:
  {"op": "pid"}                                         -> {"pid": P}   (aclrtDeviceGetBareTgid: the pid IPC
                                                                          allow-lists hold)
  {"op": "init", "model", "num_blocks", "block_size", "seed", "weights": bool, "kv": {pool: key} | null,
   "max_num_seqs", "max_model_len"}
                                                        -> {"kv_bytes": N}  (kv: import these pools, IPC memory)
  {"op": "export", "pids": [P, ...]}                    -> {"keys": {pool: key}}
  {"op": "attach_peer", "keys": {pool: key}}            -> {}   (disaggregated: import the prefill worker's pools,
                                                                  on another NPU)
  {"op": "prefill", "prompts": [[t...]], "blocks": [[b...]], "starts": [n...]}   (prompts or chunks; starts:
                                                                  tokens of each already in the KV cache)
  {"op": "decode", "tokens": [t...], "context_lens": [n...], "blocks": [[b...]]}
                                        -> {"tokens": [...], "device_ms": x, "host_ms": y, "issue_ms": z}
  {"op": "pull", "blocks": [[src, dst], ...]}           -> {}   (disaggregated: copy KV blocks from the imported
                                                                  peer pools into this worker's own)
A request that fails answers {"error": message}; the worker goes on. End of input: it frees everything, exits 0.
"""

from __future__ import annotations

import json
import sys

import acl
from workloads.acl_executor import AclModel, check, checked
from workloads.batching import power_of_two_buckets
from workloads.model import CacheConfig, kv_cache_specs, model_config
from workloads.weights import device_weights, random_checkpoint

EXPORT_DEFAULT = 0  # ACL_RT_IPC_MEM_EXPORT_FLAG_DEFAULT: the pid allow-list is checked
IMPORT_PEER = 1  # ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS: memory of another NPU
DEVICE_TO_DEVICE = 3


class Worker:
    def __init__(self) -> None:
        check(acl.init(), "init")
        check(acl.rt.set_device(0), "set_device(0)")
        self.model: AclModel | None = None
        self.imported: list[str] = []  # keys of IPC memory this worker imported
        self.peer: dict[str, int] = {}  # pool name -> address of the peer worker's pool (disaggregated)
        self.exported: list[str] = []

    def pid(self) -> dict:
        return {"pid": checked(acl.rt.device_get_bare_tgid(), "device_get_bare_tgid")}

    def init(
        self,
        model: str,
        num_blocks: int,
        block_size: int,
        seed: int,
        weights: bool,
        kv: dict | None,
        max_num_seqs: int,
        max_model_len: int,
    ) -> dict:
        """Load the model. `kv`: the KV pools to use, exported by a co-located process (no copy). Decode steps
        run as captured graphs per batch-size bucket; their padding rows write into one scratch block past the
        coordinator's `num_blocks`."""
        config = model_config(model)
        cache = CacheConfig(num_blocks + 1, block_size)
        host = device_weights(config, random_checkpoint(config, seed)) if weights else None
        pools = {name: self._import(key, 0) for name, key in (kv or {}).items()}
        buckets = power_of_two_buckets(max_num_seqs)
        self.model = AclModel(config, cache, host, kv=pools, buckets=buckets, max_context=max_model_len)
        return {"kv_bytes": sum(size for _, size in self.model.kv_pools().values())}

    def export(self, pids: list[int]) -> dict:
        """Export this worker's KV pools to the processes `pids`."""
        keys = {}
        for name, (ptr, size) in self._model().kv_pools().items():
            key = checked(acl.rt.ipc_mem_get_export_key(ptr, size, EXPORT_DEFAULT), f"export {name}")
            check(acl.rt.ipc_mem_set_import_pid(key, pids), f"set_import_pid {name}")
            self.exported.append(key)
            keys[name] = key
        return {"keys": keys}

    def attach_peer(self, keys: dict[str, str]) -> dict:
        """Import a disaggregated prefill worker's KV pools (another NPU) to pull blocks from."""
        self.peer = {name: self._import(key, IMPORT_PEER) for name, key in keys.items()}
        return {}

    def prefill(self, prompts: list[list[int]], blocks: list[list[int]], starts: list[int] | None = None) -> dict:
        model = self._model()
        return self._timed(model, model.prefill(prompts, blocks, starts))

    def decode(self, tokens: list[int], context_lens: list[int], blocks: list[list[int]]) -> dict:
        model = self._model()
        return self._timed(model, model.decode(tokens, context_lens, blocks))

    def pull(self, blocks: list[list[int]]) -> dict:
        """Copy KV blocks [src, dst] from the peer's pools into ours: device to device, across the interconnect."""
        model = self._model()
        specs = kv_cache_specs(model.config, model.cache)
        pools = model.kv_pools()
        for name, spec in specs.items():
            block_bytes = spec.nbytes // model.cache.num_blocks
            ptr, size = pools[name]
            for src, dst in blocks:
                offset = dst * block_bytes
                source = self.peer[name] + src * block_bytes
                copy = acl.rt.memcpy_async(
                    ptr + offset, size - offset, source, block_bytes, DEVICE_TO_DEVICE, model.stream
                )
                check(copy, f"pull {name}")
        check(acl.rt.synchronize_stream(model.stream), "synchronize_stream")
        return {}

    def close(self) -> None:
        for key in self.imported:
            acl.rt.ipc_mem_close(key)
        if self.model is not None:
            for key in self.exported:
                acl.rt.ipc_mem_close(key)
            self.model.close()
        else:
            acl.rt.reset_device(0)
        acl.finalize()

    def _import(self, key: str, flags: int) -> int:
        ptr = checked(acl.rt.ipc_mem_import_by_key(key, flags), "ipc_mem_import_by_key")
        self.imported.append(key)
        return ptr

    def _model(self) -> AclModel:
        if self.model is None:
            raise RuntimeError("no model: send init first")
        return self.model

    @staticmethod
    def _timed(model: AclModel, tokens: list[int]) -> dict:
        return {"tokens": tokens, "device_ms": model.device_ms, "host_ms": model.host_ms, "issue_ms": model.issue_ms}


def main() -> None:
    worker = Worker()
    handlers = {
        "pid": worker.pid,
        "init": worker.init,
        "export": worker.export,
        "attach_peer": worker.attach_peer,
        "prefill": worker.prefill,
        "decode": worker.decode,
        "pull": worker.pull,
    }
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request.pop("op")
            try:
                answer = handlers[op](**request)
            except Exception as exc:  # one failed request is answered as such; the worker serves the next
                answer = {"error": f"{op}: {exc}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        worker.close()


if __name__ == "__main__":
    main()
