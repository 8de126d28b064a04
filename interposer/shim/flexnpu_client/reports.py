"""Host callbacks in stream order (aclrtSubscribeReport, aclrtLaunchCallback, aclrtProcessReport).

launch_callback records an event on the stream where the callback stands; process_report, called by the
thread subscribed to that stream, takes the thread's next callback, waits for its event (so everything
queued before it on the stream has run) and then calls it. Callbacks therefore run in stream order, in the
subscribed thread, as on a real host. A callback launched with ACL_CALLBACK_BLOCK holds the stream's later
work: whoever queues work on that stream after it waits (hold) until it has returned, and
synchronize_stream waits for every callback queued on the stream.
"""

from __future__ import annotations

import queue
import threading

from .codec import Op
from .errors import AclCallError, AclError


class Reports:
    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self._threads: dict[int, threading.Thread] = {}
        self._subscriber: dict[int, int] = {}  # stream -> thread id
        self._pending: dict[int, queue.SimpleQueue] = {}  # thread id -> (event, fn, user_data, stream, waiting)
        self._waiting: dict[int, list[tuple[threading.Event, bool]]] = {}  # stream -> (done, blocks) not yet run
        self._lock = threading.Lock()

    def start_thread(self, fn, args) -> int:
        thread = threading.Thread(target=fn, args=(args,), daemon=True, name="acl-report")
        thread.start()
        self._threads[thread.ident] = thread
        return thread.ident

    def stop_thread(self, thread_id: int) -> None:
        thread = self._threads.pop(thread_id, None)
        if thread is None:
            raise AclCallError(f"stop_thread({thread_id}): not a thread acl.util.start_thread started")
        thread.join()

    def subscribe(self, thread_id: int, stream: int) -> None:
        with self._lock:
            if stream in self._subscriber:
                raise AclCallError(
                    f"subscribe_report: stream 0x{stream:x} already reports to thread {self._subscriber[stream]}"
                )
            self._subscriber[stream] = thread_id
            self._pending.setdefault(thread_id, queue.SimpleQueue())

    def unsubscribe(self, thread_id: int, stream: int) -> None:
        with self._lock:
            if self._subscriber.get(stream) != thread_id:
                raise AclCallError(f"unsubscribe_report: stream 0x{stream:x} does not report to thread {thread_id}")
            del self._subscriber[stream]

    def launch(self, fn, user_data, block: bool, stream: int) -> None:
        thread_id = self._subscriber.get(stream)
        if thread_id is None:
            raise AclCallError(
                f"launch_callback: stream 0x{stream:x} has no subscribed thread; call acl.rt.subscribe_report first"
            )
        event = self.runtime.create(Op.EVENT_CREATE, route=stream)
        self.runtime.submit(Op.EVENT_RECORD, event, event=event, stream=stream)
        waiting = (threading.Event(), bool(block))
        with self._lock:
            self._waiting.setdefault(stream, []).append(waiting)
        self._pending[thread_id].put((event, fn, user_data, stream, waiting))

    def streams(self) -> list[int]:
        """Streams with callbacks that have not run yet."""
        with self._lock:
            return list(self._waiting)

    def hold(self, stream: int, blocking_only: bool = True) -> None:
        """Wait until the callbacks queued on `stream` that hold it (all of them: blocking_only=False) returned."""
        if not self._waiting:  # the common case: no callbacks anywhere
            return
        with self._lock:
            ahead = [done for done, blocks in self._waiting.get(stream, ()) if blocks or not blocking_only]
        for done in ahead:
            done.wait()

    def process(self, timeout_ms: int) -> None:
        # A thread may wait before it is subscribed (start_thread, then subscribe_report): its queue is made here.
        pending = self._pending.setdefault(threading.get_ident(), queue.SimpleQueue())
        try:
            event, fn, user_data, stream, waiting = pending.get(timeout=None if timeout_ms < 0 else timeout_ms / 1000)
        except queue.Empty:
            raise AclCallError(
                f"process_report: no callback within {timeout_ms} ms", AclError.RT_WAIT_TIMEOUT
            ) from None
        try:
            self.runtime.call(Op.EVENT_SYNC, event, handle=event)
            self.runtime.destroy(Op.EVENT_DESTROY, event)
            fn(user_data)
        finally:
            with self._lock:
                self._waiting[stream].remove(waiting)
                if not self._waiting[stream]:
                    del self._waiting[stream]
            waiting[0].set()
