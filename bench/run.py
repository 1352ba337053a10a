"""`make bench`: run `stem bench` on Redis and Postgres (W1-W4 next to the raw floors).

Usage: python -m bench.run [redis|postgres|sqlite ...]
"""

from __future__ import annotations

import subprocess
import sys

URLS = {
    "redis": "redis://127.0.0.1:6379/14",
    "postgres": "postgresql://postgres@127.0.0.1:5432/test?schema=stem_bench",
    "sqlite": "sqlite:///.stem/bench.db",
}


def main() -> None:
    """Run the benchmark for each named backend (default: redis and postgres)."""
    for name in sys.argv[1:] or ["redis", "postgres"]:
        subprocess.run([sys.executable, "-m", "stem_cli", "bench", "--url", URLS[name]],
                       check=False)


if __name__ == "__main__":
    main()
