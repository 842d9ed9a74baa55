"""``python -m hms_sync.sandbox``: run both reference servers in the foreground.

Prints the URLs and ``export`` lines for hms-sync, then serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hms_sync.sandbox.common import Faults
from hms_sync.sandbox.server import Sandbox, SandboxConfig, describe, run_foreground


def _latency(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError("expected MIN,MAX in milliseconds") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError("expected 0 <= MIN <= MAX")
    return pair


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number between 0 and 1") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("expected a number between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = SandboxConfig()
    parser = argparse.ArgumentParser(
        prog="python -m hms_sync.sandbox",
        description="Run the HMS-API and HMS-OMS reference servers (the sandbox).",
        epilog="example: python -m hms_sync.sandbox --api-port 8000 --oms-port 3000 "
        "--api-webhook-url http://127.0.0.1:8080/webhooks/hms-api",
    )
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--api-port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--oms-port", type=int, default=3000, help="0 picks a free port")
    parser.add_argument("--token", default=defaults.api_token, help="HMS_API_TOKEN")
    parser.add_argument("--api-key", default=defaults.oms_api_key, help="OMS_API_KEY")
    parser.add_argument("--api-webhook-secret", default=defaults.api_webhook_secret)
    parser.add_argument("--oms-webhook-secret", default=defaults.oms_webhook_secret)
    parser.add_argument("--api-webhook-url", default=None,
                        help="where HMS-API sends webhooks (hms-sync's /webhooks/hms-api)")
    parser.add_argument("--oms-webhook-url", default=None,
                        help="where HMS-OMS sends webhooks (hms-sync's /webhooks/oms)")
    parser.add_argument("--error-rate", type=_rate, default=0.0, help="share of injected 5xx")
    parser.add_argument("--rate-limit-rate", type=_rate, default=0.0,
                        help="share of injected 429")
    parser.add_argument("--latency-ms", type=_latency, default=(0, 0), metavar="MIN,MAX")
    return parser


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    return SandboxConfig(
        api_token=args.token,
        oms_api_key=args.api_key,
        api_webhook_secret=args.api_webhook_secret,
        oms_webhook_secret=args.oms_webhook_secret,
        api_webhook_url=args.api_webhook_url,
        oms_webhook_url=args.oms_webhook_url,
        host=args.host,
        api_port=args.api_port,
        oms_port=args.oms_port,
        faults=Faults(error_rate=args.error_rate, rate_limit_rate=args.rate_limit_rate,
                      latency_ms=args.latency_ms),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)

    def announce(sandbox: Sandbox) -> None:
        sys.stdout.write(describe(sandbox) + "\n\n(Ctrl+C to stop)\n")
        sys.stdout.flush()

    try:
        return run_foreground(config_from_args(args), announce)
    except OSError as exc:
        sys.stderr.write(f"sandbox: cannot listen: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
