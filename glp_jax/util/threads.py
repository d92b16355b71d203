"""Running an iterator ahead on a background thread, so the host builds batch s+1 while the device runs s."""
from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
  """Yields `items` in order, produced up to `depth` ahead by a daemon thread; an error in the producer is
  re-raised in the consumer. Daemon, so a producer blocked on a slow source (a store still being written)
  never holds the process at exit; closing the returned generator stops the producer after its current item."""
  q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
  stop = threading.Event()

  def put(item) -> bool:
    """Queues `item` unless the consumer has stopped (then nothing would ever take it): whether it did."""
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for item in items:
        if not put(item):
          return
      put(_DONE)   # the end and an error too: a consumer closed with the queue full never takes them
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer thread)
      put(e)

  threading.Thread(target=work, daemon=True, name="glp-prefetch").start()
  try:
    while (item := q.get()) is not _DONE:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
