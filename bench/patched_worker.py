"""`tiktok-worker` with one setting changed at start-up, to size a suggested change before it is
made (used by the `experiments` section of bench/run.py; never by the product).

`BENCH_PATCH` holds comma-separated `name=value` items:
- `consume_timeout_s=0.01`: `worker.consumer.CONSUME_TIMEOUT_S` (the product uses 0.1 s, and
  librdkafka's batched consume waits that long unless the whole batch is already there);
- `gc_threshold=50000`: `gc.set_threshold(value, 20, 100)` and `gc.freeze()` after imports
  (fewer collections of the many long-lived in-flight objects).

Run: `BENCH_PATCH=... python bench/patched_worker.py run --config FILE`.
"""

from __future__ import annotations

import gc
import os
import sys


def apply(spec: str) -> None:
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name == "consume_timeout_s":
            import worker.consumer

            worker.consumer.CONSUME_TIMEOUT_S = float(value)  # type: ignore[misc]
        elif name == "gc_threshold":
            gc.set_threshold(int(value), 20, 100)
        else:
            raise SystemExit(f"patched_worker: unknown patch {name!r}")


def main() -> int:
    spec = os.environ.get("BENCH_PATCH", "")
    apply(spec)
    from worker.cli import main as cli_main

    if "gc_threshold" in spec:
        gc.freeze()  # everything imported so far is permanent: never scan it again
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
