"""`python -m devkit.fake_tiktok`: run the fake Events API until SIGTERM/SIGINT, then exit 0.

Prints one line on start whose last word is the base URL (`--port 0` picks a free port):
`fake-tiktok listening on http://127.0.0.1:8080`. On stop it prints one summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from devkit.fake_tiktok.server import FakeTikTok


class UsageError(Exception):
    """A bad command-line value: one line on stderr, exit 2."""


def _options(args: argparse.Namespace) -> tuple[float, float | None, list[str] | None]:
    fault_rate = float(args.fault_rate or 0.0)
    if not 0.0 <= fault_rate <= 1.0:
        raise UsageError(f"--fault-rate: must be between 0 and 1, got {fault_rate:g}")
    throttle_qps: float | None = args.throttle_qps
    if throttle_qps is not None and throttle_qps <= 0:
        raise UsageError(f"--throttle-qps: must be > 0, got {throttle_qps:g}")
    tokens: list[str] | None = args.token
    if tokens is not None and any(not t for t in tokens):
        raise UsageError("--token: must not be empty")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: must be between 0 and 65535, got {args.port}")
    return fault_rate, throttle_qps, tokens


async def _serve(args: argparse.Namespace) -> int:
    fault_rate, throttle_qps, tokens = _options(args)
    fake = FakeTikTok(tokens=tokens, fault_rate=fault_rate, throttle_qps=throttle_qps)
    try:
        url = await fake.start(args.host, args.port)
    except OSError as exc:
        sys.stderr.write(f"fake-tiktok: cannot listen on {args.host}:{args.port}: {exc.strerror}\n")
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"fake-tiktok listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await fake.stop()
    stats = fake.stats()
    print(
        f"fake-tiktok stopped: {stats['requests_total']} requests, "
        f"{stats['accepted_events_total']} events accepted, "
        f"{stats['rejected_requests']} requests answered with an error",
        flush=True,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devkit.fake_tiktok",
        description="Local stand-in for the TikTok Events API (developer tooling, not shipped).",
    )
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of requests failing")
    parser.add_argument("--throttle-qps", type=float, help="answer 40100 above this request rate")
    parser.add_argument("--token", action="append", help="accepted access token (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = asyncio.run(_serve(args))
    except UsageError as exc:
        sys.stderr.write(f"fake-tiktok: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
