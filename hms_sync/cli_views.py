"""What the CLI shows: progress, tables and the documents behind `--json`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from .config import Settings
    from .engine import Result
    from .scan import Summary
    from .store import Store

STATE_STYLE = {"ok": "green", "pending": "yellow", "error": "red"}


class SyncProgress:
    """A live line of counts on stderr; silent when not on a terminal or for --json."""

    def __init__(self, console: Console, *, enabled: bool) -> None:
        self.enabled = enabled
        self.counts = {"seen": 0, "created": 0, "updated": 0, "unchanged": 0, "error": 0}
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )
        self._task = self._progress.add_task(self._describe(), total=None)

    def _describe(self) -> str:
        return "  ".join(f"{k} {v}" for k, v in self.counts.items())

    def advance(self, result: Result) -> None:
        self.counts["seen"] += 1
        key = "error" if result.outcome in ("error", "missing") else result.outcome
        if key in self.counts:
            self.counts[key] += 1
        if self.enabled:
            self._progress.update(self._task, description=self._describe())

    def __enter__(self) -> SyncProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)


def print_summary(console: Console, summary: Summary, *, dry_run: bool) -> None:
    doc = summary.to_dict()
    table = Table(title="sync-all (dry run: nothing written)" if dry_run else "sync-all")
    table.add_column("orders")
    table.add_column("count", justify="right")
    for key, value in doc["summary"].items():
        table.add_row(key, str(value))
    console.print(table)
    for plan in doc.get("planned", [])[:200]:
        console.print(f"  would write, API order {plan['api_id']}: "
                      + escape("; ".join(plan["writes"])))
    for e in doc["errors"][:50]:
        console.print(f"[red]error[/red] API order {e['api_id']}: {escape(str(e['error']))}",
                      markup=True)
    if len(doc["errors"]) > 50:
        console.print(f"... and {len(doc['errors']) - 50} more (see `hms-sync status --errors`)")
    for o in doc["orphans"][:20]:
        console.print(f"[yellow]orphan[/yellow] OMS order for {escape(str(o['error']))}",
                      markup=True)
    console.print(f"took {doc['seconds']:.1f} s")


def status_doc(store: Store, *, errors_only: bool, limit: int) -> dict[str, Any]:
    links = store.list_links(errors_only=errors_only, limit=limit)
    dead = store.queue_items(dead=True, limit=limit)
    return {
        "links": [
            {
                "api_id": link.api_id,
                "oms_code": link.oms_code,
                "api_status": link.api_status,
                "oms_state": link.oms_state,
                "sync_state": link.sync_state,
                "last_error": link.last_error,
                "last_sync_at": link.last_sync_at,
            }
            for link in links
        ],
        "counts": store.link_counts(),
        "queue": store.queue_counts(),
        "dead": [
            {"api_id": d["api_id"], "attempts": d["attempts"], "last_error": d["last_error"]}
            for d in dead
        ],
        "cursors": store.cursors(),
    }


def _short_time(stamp: str | None) -> str:
    """'2026-12-04T20:20:33.051868Z' -> '2026-12-04 20:20:33'."""
    return stamp[:19].replace("T", " ") if stamp else "-"


def print_status(console: Console, doc: dict[str, Any]) -> None:
    table = Table(title="links", box=box.SIMPLE_HEAD, pad_edge=False)
    wide = console.width >= 140  # else errors are listed under the table, unabridged
    for col in ("API id", "OMS code", "API status", "OMS state", "sync", "last sync (UTC)"):
        table.add_column(col, no_wrap=True)
    if wide:
        table.add_column("last error", overflow="fold", ratio=1)
    for row in doc["links"]:
        style = STATE_STYLE.get(row["sync_state"], "")
        cells = [
            str(row["api_id"]), escape(row["oms_code"] or "-"), escape(row["api_status"] or "-"),
            escape(row["oms_state"] or "-"), f"[{style}]{row['sync_state']}[/{style}]",
            _short_time(row["last_sync_at"]),
        ]
        table.add_row(*cells, *([escape(row["last_error"] or "")] if wide else []))
    console.print(table)
    if not wide:
        for row in doc["links"]:
            if row["last_error"]:
                console.print(f"[red]error[/red] API order {row['api_id']}: "
                              f"{escape(row['last_error'])}", markup=True)
    c, q = doc["counts"], doc["queue"]
    console.print(
        f"links: {c['ok']} ok, {c['pending']} pending, {c['error']} in error; "
        f"queue: {q['pending']} waiting, {q['dead']} dead"
    )
    for d in doc["dead"]:
        console.print(
            f"[red]dead[/red] API order {d['api_id']} after {d['attempts']} attempt(s): "
            f"{escape(str(d['last_error']))}", markup=True,
        )
    if doc["cursors"]:
        console.print("cursors: " + ", ".join(f"{k} {v}" for k, v in doc["cursors"].items()))


async def run_checks(settings: Settings) -> dict[str, Any]:
    """What `hms-sync check` reports: config, store, and one authenticated call each."""
    from .config import redacted
    from .errors import HmsSyncError
    from .runtime import runtime
    from .store import Store

    doc: dict[str, Any] = {"config": redacted(settings), "ok": True, "checks": {}}
    try:
        store = Store(settings.db)
        doc["checks"]["store"] = {"ok": True, "detail": f"schema v{store.schema_version}"}
    except HmsSyncError as exc:
        doc["checks"]["store"] = {"ok": False, "detail": str(exc)}
        doc["ok"] = False
        return doc
    async with runtime(settings, store) as rt:
        for name, client in (("HMS-API", rt.engine.api), ("HMS-OMS", rt.engine.oms)):
            try:
                await client.ping()
                doc["checks"][name] = {"ok": True, "detail": "reachable, credential accepted"}
            except HmsSyncError as exc:
                doc["checks"][name] = {"ok": False, "detail": str(exc)}
                doc["ok"] = False
    store.close()
    secrets = {
        "HMS_API_WEBHOOK_SECRET": settings.hms_api_webhook_secret,
        "OMS_WEBHOOK_SECRET": settings.oms_webhook_secret,
    }
    missing = [k for k, v in secrets.items() if v is None or not v.get_secret_value()]
    if settings.webhooks_enabled and missing:
        doc["checks"]["webhooks"] = {"ok": False, "detail": f"missing {', '.join(missing)}"}
        doc["ok"] = False
    else:
        doc["checks"]["webhooks"] = {
            "ok": True, "detail": "enabled" if settings.webhooks_enabled else "off (polling only)"
        }
    return doc


def print_check(console: Console, doc: dict[str, Any]) -> None:
    for name, check in doc["checks"].items():
        mark = "[green]ok[/green]" if check["ok"] else "[red]FAIL[/red]"
        console.print(f"{mark}  {name}: {escape(str(check['detail']))}", markup=True)
