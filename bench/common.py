"""What every benchmark here does around its run: SIGTERM ends it through the clean-up, a
failure of its own checks (RuntimeError, ProcessFailed included) shows each process's log
tail, the clean-up always runs, and the figures are the last line on stdout."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterable
from typing import Any


def run(bench: Any, groups: Callable[[], Iterable[Any]], log: Callable[[str], None]) -> int:
    """`bench.run()` then `bench.cleanup()`; `groups()` gives the ProcessGroups (or None)
    whose logs explain a failure. Returns the exit code: 0 with the JSON printed, else 1."""

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        result = bench.run()
    except RuntimeError as exc:  # anything else shows its traceback
        log(f"FAILED: {type(exc).__name__}: {exc}")
        for group in groups():
            for name in list(group.procs) if group is not None else ():
                log(f"--- {name} log (tail) ---\n{group.logs(name, 3000)}")
        return 1
    finally:
        log("cleaning up")
        bench.cleanup()
    log(f"done in {result['bench_wall_s']}s")
    print(json.dumps(result), flush=True)
    return 0
