"""Record when each ``alert_id`` first arrives on ``wd:alerts:v1``, in a process of its own.

``python -m simulators.listen REDIS_URL OUT_FILE`` prints ``READY`` once subscribed, then appends
``alert_id<TAB>epoch_ms`` per first arrival to ``OUT_FILE`` until SIGTERM. A load run uses it so that arrival times
are taken by a process that does nothing else: in the publishing process a listener thread waits for the GIL,
which adds milliseconds to every latency it measures.
"""

from __future__ import annotations

import sys
import time

import orjson
import redis

from handoff import keys
from simulators._signals import stop_on_signals


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m simulators.listen REDIS_URL OUT_FILE", file=sys.stderr)
        return 2
    url, out = args
    stop = stop_on_signals()
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(keys.ALERTS_CHANNEL)
    seen: set[str] = set()
    with open(out, "w") as fh:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.2)
            if msg is None:
                continue
            if msg["type"] == "subscribe":
                print("READY", flush=True)
                continue
            if msg["type"] != "message":
                continue
            now_ms = time.time() * 1000
            try:
                alert_id = str(orjson.loads(msg["data"])["alert_id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if alert_id not in seen and "\t" not in alert_id and "\n" not in alert_id:
                seen.add(alert_id)
                fh.write(f"{alert_id}\t{now_ms:.3f}\n")
    pubsub.close()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
