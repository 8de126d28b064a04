"""Direct mode: no daemon, the same frames go to a translator in this process (the passthrough baseline).

Only this module loads the rest of FlexNPU (the translator, the emulated NPUs and their dependencies), and
only when direct mode is asked for: an interposed process in a container never imports it.
"""

from __future__ import annotations

import logging
import os
import sys

from .errors import AclCallError, AclError


class DirectTransport:
    """Frames go straight to an in-process translator; waits run in the calling thread."""

    def __init__(self, translator) -> None:
        from interposer import wire
        from interposer.session import answer_sync

        self.translator = translator
        self._decode, self._answer = wire.decode_records, answer_sync  # bound once: call() is the hot path
        self._frames = wire.FrameBuffer()
        self._replies = wire.FrameBuffer()

    def send(self, frame: list) -> None:
        self.call(frame)

    def call(self, frame: list | bytes):
        reply: list = []
        for part in [frame] if isinstance(frame, bytes) else frame:
            for count, body in self._frames.feed(part):
                reply = self._answer(self.translator, self._decode(count, body)) or []
        # The reply is reassembled as the FUSE client would, without copying its parts.
        bodies = [body for part in reply for _, body in self._replies.feed(part)]
        return bodies[0] if bodies else memoryview(b"")

    def close(self) -> None:
        self.translator.close()


class DirectTopology:
    """The virtual NPUs of FLEXNPU_CONFIG (default: built in), running in this process."""

    def __init__(self, config: str | None) -> None:
        try:
            import structlog

            from interposer import config as topology_config
        except ImportError as exc:
            raise AclCallError(
                f"direct mode (FLEXNPU_DIRECT=1) needs the flexnpu package installed ({exc}); "
                "unset FLEXNPU_DIRECT to use a daemon's device files",
                AclError.RT_NO_DEVICE,
            ) from None
        if not structlog.is_configured():
            # The translator's logs: the program's stdout is its own, so warnings and worse go to stderr.
            structlog.configure(
                logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            )
        try:
            topology = topology_config.build(topology_config.load(config), driver="sync")
        except topology_config.ConfigError as exc:
            raise AclCallError(f"FLEXNPU_CONFIG: {exc}", AclError.RT_NO_DEVICE) from None
        self._vdevs = {v.name: v for v in topology.virtual}

    @property
    def names(self) -> list[str]:
        return list(self._vdevs)

    def transport(self, name: str) -> DirectTransport:
        from interposer.translate import Translator

        if name not in self._vdevs:
            raise AclCallError(f"{name}: no such virtual NPU (have {', '.join(self._vdevs)})", AclError.RT_NO_DEVICE)
        return DirectTransport(Translator(self._vdevs[name], os.getpid()))
