#!/usr/bin/env python3
"""Python kser 0.8.27's own consumer on a backlog of no-op tasks: the rate
that examples/bench.rs compares kser with.

    python scripts/bench_python_kser.py BROKERS TOPIC GROUP COUNT

It runs `kser.confluent.consumer.Consumer` (librdkafka through
confluent-kafka) unchanged, its controller with one registered entrypoint,
`bench.Noop`, whose `run` does nothing; nothing is persisted. It stops after
COUNT tasks and prints one JSON line:

    {"tasks": N, "failed": N, "seconds": S, "rate": R, "peak_rss_kib": K,
     "cpu_seconds": C}

The clock runs from the first task finished to the last, so the consumer
group's join is left out, as it is for kser; the CPU time (user and system)
is the whole process's, its start included. Exit code 3 when Python kser or
confluent-kafka is not installed.
"""

import json
import os
import resource
import sys
import tempfile
import time


class Done(Exception):
    """Raised out of Python kser's consumer loop, which never ends by itself."""


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    brokers, topic, group, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    # Python kser writes the running task's name to a lock file for every
    # message, under $LOCK_PATH (default /var/run): keep it in a temporary
    # directory. It reads these when it is imported.
    lock_dir = tempfile.mkdtemp(prefix="kser-bench-py-")
    os.environ["LOCK_PATH"] = lock_dir
    for name in ("RUNNING_FILE", "LOCK_FILE", "TERMINATE_FILE"):
        os.environ.pop(name, None)
    try:
        from cdumay_result import Result
        from kser.confluent.consumer import Consumer
        from kser.controller import Controller
        from kser.entry import Entrypoint
    except ImportError as exc:
        print(f"Python kser with confluent-kafka is not installed: {exc}", file=sys.stderr)
        sys.exit(3)

    class Noop(Entrypoint):
        def run(self):
            return Result(uuid=self.uuid)

    class Bench(Controller):
        ENTRYPOINTS = {}
        tasks = 0
        failed = 0
        first = None
        last = None

        @classmethod
        def onsuccess(cls, kmsg, result):
            cls.tick()
            return result

        @classmethod
        def onerror(cls, kmsg, result):
            cls.failed += 1
            cls.tick()
            return result

        @classmethod
        def tick(cls):
            now = time.perf_counter()
            cls.tasks += 1
            if cls.first is None:
                cls.first = now
            if cls.tasks >= count:
                cls.last = now
                raise Done()

    class BenchConsumer(Consumer):
        REGISTRY = Bench

    Bench.register("bench.Noop", Noop)
    consumer = BenchConsumer(
        {"bootstrap.servers": brokers, "group.id": group, "auto.offset.reset": "earliest"},
        [topic],
    )
    try:
        consumer.run()
    except Done:
        pass
    finally:
        consumer.client.close()
        for name in os.listdir(lock_dir):
            os.remove(os.path.join(lock_dir, name))
        os.rmdir(lock_dir)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    seconds = Bench.last - Bench.first
    print(
        json.dumps(
            {
                "tasks": Bench.tasks,
                "failed": Bench.failed,
                "seconds": seconds,
                "rate": (Bench.tasks - 1) / seconds if seconds > 0 else 0.0,
                "peak_rss_kib": usage.ru_maxrss,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
            }
        )
    )


if __name__ == "__main__":
    main()
