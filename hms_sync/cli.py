"""The `hms-sync` command: a thin shell over the library.

Each command parses its arguments, calls one library function, and turns expected failures
into one red line on stderr and an exit code (2: bad configuration or usage, 1: the work
failed). Heavy libraries are imported inside the commands that need them, so `--help` and
`status` start fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from .config import Settings
    from .store import Store

app = typer.Typer(
    name="hms-sync",
    help="Keep orders in HMS-API and HMS-OMS in step.\n\n"
    "Configuration comes from flags, then the environment (HMS_API_URL, HMS_API_TOKEN, "
    "OMS_API_URL, OMS_API_KEY, ...), then the TOML file (--config or HMS_SYNC_CONFIG).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file [env: HMS_SYNC_CONFIG]."),
]
DbOpt = Annotated[
    str | None, typer.Option("--db", help="SQLite store file [env: HMS_SYNC_DB].")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}", markup=True)
    raise typer.Exit(code)


def settings_for(
    config: Path | None, *, credentials: bool = True, **flags: Any
) -> Settings:
    from .config import load_settings
    from .errors import ConfigError
    from .logs import configure_logging

    # The commands report results themselves; log only what they cannot.
    configure_logging("ERROR")
    try:
        return load_settings(
            config_file=config, overrides=flags, require_credentials=credentials
        )
    except ConfigError as exc:
        fail(f"configuration: {exc}", 2)


def store_for(settings: Settings, *, create: bool = True) -> Store:
    from .errors import StoreError
    from .store import Store

    try:
        return Store(settings.db, create=create)
    except StoreError as exc:
        fail(str(exc), 2)


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def _run(coro: Any) -> Any:
    """Run a coroutine; expected errors become one line, never a traceback."""
    import asyncio

    from .errors import HmsSyncError, StoreError, Unauthorized

    try:
        return asyncio.run(coro)  # imported here: asyncio costs ~40 ms of start-up
    except Unauthorized as exc:
        fail(str(exc), 1)
    except StoreError as exc:
        fail(str(exc), 2)
    except HmsSyncError as exc:
        fail(str(exc), 1)


# -- commands ------------------------------------------------------------------------------


@app.command("run")
def run_cmd(
    config: ConfigOpt = None,
    db: DbOpt = None,
    host: Annotated[str | None, typer.Option(help="Receiver address [env: HMS_SYNC_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Receiver port [env: HMS_SYNC_PORT].")] = None,
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="text or json [env: HMS_SYNC_LOG_FORMAT].")
    ] = None,
) -> None:
    """Run the daemon: poll both systems, drain the retry queue, serve webhooks.

    Serves POST /webhooks/hms-api, POST /webhooks/oms, GET /healthz and GET /metrics.
    SIGTERM or SIGINT stops it cleanly (exit 0). Example:

        HMS_SYNC_CONFIG=/etc/hms-sync.toml hms-sync run --port 8080
    """
    from .daemon import run_daemon

    settings = settings_for(config, db=db, host=host, port=port, log_format=log_format)
    code = run_daemon(settings)
    raise typer.Exit(code)


@app.command("sync-all")
def sync_all_cmd(
    config: ConfigOpt = None,
    db: DbOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the writes it would make; write nothing.")
    ] = False,
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=256, help="Orders in flight at once.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Reconcile every order of both systems (the seed's `rake hms_api:sync_orders`).

    Exit 0 when every order is in step, 1 when any is in error. Example:

        hms-sync sync-all --dry-run
    """
    from .cli_views import SyncProgress, print_summary
    from .runtime import runtime
    from .scan import sync_all

    settings = settings_for(config, db=db, concurrency=concurrency)
    store = store_for(settings)

    async def go() -> Any:
        async with runtime(settings, store) as rt:
            with SyncProgress(err, enabled=not as_json and err.is_terminal) as bar:
                return await sync_all(
                    rt.engine, dry_run=dry_run, concurrency=settings.concurrency,
                    progress=bar.advance,
                )

    try:
        summary = _run(go())
    finally:
        store.close()
    if as_json:
        emit_json({"dry_run": dry_run, **summary.to_dict()})
    else:
        print_summary(out, summary, dry_run=dry_run)
    raise typer.Exit(0 if summary.ok else 1)


@app.command("import")
def import_cmd(
    order_id: Annotated[int, typer.Argument(min=1, help="The HMS-API order id.")],
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch one HMS-API order and create or update its OMS order and link.

    The seed's `rake hms_api:import_order[12345]`. Example:

        hms-sync import 12345
    """
    from .runtime import runtime

    settings = settings_for(config, db=db)
    store = store_for(settings)

    async def go() -> Any:
        async with runtime(settings, store) as rt:
            # An operator asking for this order means "try again", even after a failure.
            return await rt.engine.reconcile(order_id, force=True)

    try:
        result = _run(go())
    finally:
        store.close()
    doc = {
        "api_id": result.api_id, "outcome": result.outcome, "oms_code": result.oms_code,
        "writes": result.writes, "error": result.error,
    }
    if as_json:
        emit_json(doc)
    elif result.outcome in ("error", "missing"):
        err.print(f"[red]error:[/red] API order {order_id}: {escape(result.error or '')}",
                  markup=True)
    else:
        writes = "; ".join(result.writes) or "nothing to write"
        out.print(f"API order {order_id} -> OMS order {result.oms_code}: {result.outcome} "
                  f"({writes})")
    raise typer.Exit(1 if result.outcome in ("error", "missing") else 0)


@app.command("status")
def status_cmd(
    config: ConfigOpt = None,
    db: DbOpt = None,
    errors: Annotated[bool, typer.Option("--errors", help="Only orders in error.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Show links (ids, both statuses, sync state, last error, last sync) and the queue.

    Needs only the store, not the systems' credentials. Example:

        hms-sync status --errors --limit 20
    """
    from .cli_views import print_status, status_doc

    settings = settings_for(config, db=db, credentials=False)
    from .errors import StoreError

    store = store_for(settings, create=False)
    try:
        doc = status_doc(store, errors_only=errors, limit=limit)
    except StoreError as exc:
        fail(str(exc), 2)
    finally:
        store.close()
    if as_json:
        emit_json(doc)
    else:
        print_status(out, doc)


@app.command("retry")
def retry_cmd(
    order_ids: Annotated[list[int] | None, typer.Argument(help="API order ids to retry.")] = None,
    all_dead: Annotated[bool, typer.Option("--all", help="Retry every dead item.")] = False,
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put dead (given-up) orders back in the queue; the daemon tries them again.

    Example: `hms-sync retry 12 13` or `hms-sync retry --all`.
    """
    if not order_ids and not all_dead:
        fail("name the order ids to retry, or pass --all", 2)
    if order_ids and all_dead:
        fail("pass either order ids or --all, not both", 2)
    settings = settings_for(config, db=db, credentials=False)
    from .errors import StoreError

    store = store_for(settings, create=False)
    try:
        n = store.requeue_dead(None if all_dead else order_ids)
    except StoreError as exc:  # e.g. locked by another process past the busy timeout
        fail(str(exc), 2)
    finally:
        store.close()
    if as_json:
        emit_json({"requeued": n})
    else:
        out.print(f"requeued {n} order(s)")


@app.command("check")
def check_cmd(config: ConfigOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Check the configuration, the store and both systems' credentials, and say what was found.

    Exit 0 when all is well, 1 when a system cannot be reached or refuses us, 2 on bad
    configuration. Example:

        hms-sync check --json
    """
    from .cli_views import print_check, run_checks

    settings = settings_for(config, db=db)
    doc = _run(run_checks(settings))
    if as_json:
        emit_json(doc)
    else:
        print_check(out, doc)
    raise typer.Exit(0 if doc["ok"] else 1)


@app.command("sandbox")
def sandbox_cmd(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    api_port: Annotated[int, typer.Option(help="HMS-API port (0: any free port).")] = 8000,
    oms_port: Annotated[int, typer.Option(help="HMS-OMS port (0: any free port).")] = 3000,
    webhook_url: Annotated[
        str | None,
        typer.Option(help="Where the daemon listens, e.g. http://127.0.0.1:8080 "
                     "(webhooks go to /webhooks/hms-api and /webhooks/oms)."),
    ] = None,
    error_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of 5xx answers.")] = 0.0,
    rate_limit_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of 429 answers.")
    ] = 0.0,
) -> None:
    """Run reference HMS-API and HMS-OMS servers for trying hms-sync without real systems.

    Prints their URLs and credentials as `export` lines to paste into another shell.
    Example:

        hms-sync sandbox --webhook-url http://127.0.0.1:8080
    """
    from .sandbox.common import Faults
    from .sandbox.server import SandboxConfig, describe, run_foreground

    cfg = SandboxConfig(
        host=host, api_port=api_port, oms_port=oms_port,
        faults=Faults(error_rate=error_rate, rate_limit_rate=rate_limit_rate),
    )
    if webhook_url:
        base = webhook_url.rstrip("/")
        cfg.api_webhook_url = f"{base}/webhooks/hms-api"
        cfg.oms_webhook_url = f"{base}/webhooks/oms"
    try:
        code = run_foreground(cfg, announce=lambda sb: out.print(describe(sb)))
    except OSError as exc:
        fail(f"cannot start the sandbox: {exc.strerror or exc}", 2)
    raise typer.Exit(code)


@app.command("demo")
def demo_cmd(
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Stay up after the demo for exploring.")
    ] = False,
    orders: Annotated[int, typer.Option(min=1, max=50, help="How many orders to place.")] = 5,
) -> None:
    """Run the sandbox and the daemon together and play the seed's flows, live.

    Example:

        hms-sync demo --orders 3 --keep-running
    """
    from .demo import run_demo

    raise typer.Exit(run_demo(err, orders=orders, keep_running=keep_running))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C outside the daemon
        err.print("interrupted")
        sys.exit(130)
