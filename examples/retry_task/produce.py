"""Enqueue ``charge`` a few times and print each result (the compose stack's producer).

    python -m examples.retry_task.produce --count 3
"""

from __future__ import annotations

import argparse
import asyncio

from examples.retry_task.app import app, charge


async def main(count: int, timeout: float) -> int:
    try:
        ids = [await charge.enqueue(order_id=n) for n in range(1, count + 1)]
        for task_id in ids:
            result = await app.wait(task_id, timeout=timeout)
            print(f"{task_id}: {result.state.value} attempt={result.attempt} "
                  f"value={result.value!r}", flush=True)
        return 0
    finally:
        await app.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3, help="How many tasks to enqueue.")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="Seconds to wait for each result.")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.count, args.timeout)))
