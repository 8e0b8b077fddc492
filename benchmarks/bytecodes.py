"""Python bytecodes per message of a ``farm serve -w 1`` worker, function by function.

Usage: ``.venv/bin/python benchmarks/bytecodes.py [--profile production|nolog|nolimits|bare]
[--messages N] [--workload per-conn|long] [--handler sink|relay] [--top K]``; ``PYTHONPATH=TREE``
picks the tree (``--handler relay``: the relay to an ``smtp-sink``, as in ``instructions.py``).

Where :mod:`instructions` gives one total, this says which functions run the bytecodes: the
worker traces itself (``sys.settrace`` with ``f_trace_opcodes``, started in the forked worker
by a ``sitecustomize`` this script puts on ``PYTHONPATH``) and counts every bytecode executed,
per function. As in ``instructions.py``, the worker takes N and then 3N messages from
``smtp-source -s 20 -l 1024`` after the same warm-up, and the difference over 2N is what one
message costs (start-up and stop cancel). The count is exact and does not depend on the
machine's load; tracing makes the worker ~100x slower, so timers (the log's 100 ms flush) fire
for fewer messages than at full speed. C code (uvloop, the interpreter's builtins) is not
counted: it runs no bytecode. Needs ``smtp-source`` (Debian: postfix).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from instructions import (  # noqa: E402  (benchmarks/instructions.py)
    free_port,
    run_options,
    send_messages,
    wait_greeting,
    worker_argv,
    worker_config,
)

READY_WITHIN = 120.0

#: Loaded by the farm's processes (``sitecustomize`` on PYTHONPATH): the worker counts the
#: bytecodes it runs, per function, and writes them as JSON to $FARM_BYTECODES when it ends.
SITECUSTOMIZE = """
import os
if os.environ.get("FARM_BYTECODES"):
    import collections, json, sys
    import farm.supervisor.worker as worker

    counts = collections.Counter()

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        code = frame.f_code
        where = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno}:{code.co_qualname}"

        def count(frame, event, arg):
            if event == "opcode":
                counts[where] += 1
            return count

        return count

    serve = worker._worker_process

    def traced(spec):
        sys.settrace(trace)
        try:
            return serve(spec)
        finally:
            sys.settrace(None)
            with open(os.environ["FARM_BYTECODES"], "w") as out:
                json.dump(counts, out)

    worker._worker_process = traced
"""


def worker_bytecodes(profile: str, messages: int, long: bool, handler: str) -> dict[str, int]:
    """The worker's bytecodes per function over a run of ``messages`` (after the warm-up)."""
    with tempfile.TemporaryDirectory(prefix="farm-bytecodes-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        (workdir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        counts = workdir / "counts.json"
        config, handler_spec = worker_config(workdir, profile, handler, stack)
        port = free_port()
        path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), tmp) if p)
        env = dict(os.environ, PYTHONPATH=path, FARM_BYTECODES=str(counts))
        command = worker_argv(config, port, handler_spec)
        with (workdir / "stderr").open("wb") as err:
            # (cwd: not the checkout, whose farm ``-m farm`` would import before PYTHONPATH's)
            farm = subprocess.Popen(
                command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=err
            )
        try:
            wait_greeting(port, time.monotonic() + READY_WITHIN)
            send_messages(port, messages, long)
        finally:
            farm.terminate()
            farm.wait(READY_WITHIN)
        if not counts.exists():
            raise SystemExit(f"the worker wrote no counts; its stderr: {workdir / 'stderr'}")
        found: dict[str, int] = json.loads(counts.read_text())
        return found


def main() -> int:
    parser = run_options(__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=40, help="functions listed")
    args = parser.parse_args()
    if args.server != "farm":
        parser.error("--server: only a farm worker's bytecodes are counted here")
    long = args.workload == "long"
    few = worker_bytecodes(args.profile, args.messages, long, args.handler)
    more = worker_bytecodes(args.profile, 3 * args.messages, long, args.handler)
    per_message = {
        where: (more.get(where, 0) - few.get(where, 0)) / (2 * args.messages)
        for where in set(few) | set(more)
    }
    tree = os.environ.get("PYTHONPATH", "(installed farm)")
    total = sum(per_message.values())
    print(f"{args.profile}, {args.workload}, {args.handler}, {tree}: {total:.0f} bytecodes/msg")
    ranked = sorted(per_message.items(), key=lambda item: -item[1])
    for where, count in ranked[: args.top]:
        print(f"{count:8.1f}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
