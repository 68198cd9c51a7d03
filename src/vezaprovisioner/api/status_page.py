"""GET {base}/status: one HTML page for the Exchange admin, rendered on the server.

Is the service ready (each readiness check), how is the backend (pool hosts by state and the last
startup error with its fix, or the remote endpoint), what happened in the last 24 hours (counts by
outcome and code, failures with the sentence that says what to do) and the last 50 requests,
each linked to its journal record. CSS is inline, nothing is loaded from elsewhere, and the page
refreshes itself. Authenticated like the API (it is not a public path).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from html import escape
from urllib.parse import quote

from .. import __version__
from ..failures import advice_for_code
from ..journal.records import Record
from ..services import Services
from .models import ReadinessCheck as Check

REFRESH_SECONDS = 30
RECENT = 50
FAILURES = 20
DAY_SECONDS = 86_400
_FAILED_STATES = frozenset({"failed", "not_created", "unknown"})

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1f24;
background:#f4f6f8}
header{background:#1b1f24;color:#fff;padding:14px 24px;display:flex;align-items:center;gap:16px}
header h1{font-size:18px;margin:0;font-weight:600}
header .meta{color:#b8c0c8;font-size:12px}
main{padding:16px 24px;display:grid;gap:16px;
grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}
section{background:#fff;border:1px solid #d8dee4;border-radius:6px;padding:12px 16px}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 8px}dl+h2{margin-top:16px}
.fix{display:block;margin-top:4px;color:#1b1f24}.fix::before{content:"What to do: ";font-weight:600}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eaeef2;vertical-align:top;
overflow-wrap:anywhere}
th{font-weight:600;color:#57606a;font-size:12px;text-transform:uppercase}
.badge{display:inline-block;padding:4px 12px;border-radius:12px;font-weight:700;color:#fff}
.ok .badge,.badge.ok{background:#1a7f37}.bad .badge,.badge.bad{background:#cf222e}
td.state-created,td.state-already_exists{color:#1a7f37;font-weight:600}
td.state-failed,td.state-not_created,td.state-unknown{color:#cf222e;font-weight:600}
.error{background:#fff1f0;border-left:4px solid #cf222e;padding:8px 12px;margin:8px 0;
white-space:pre-wrap;word-break:break-word}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px;margin:0}
dt{color:#57606a}dd{margin:0;font-weight:600}
.empty{color:#57606a;font-style:italic}
a{color:#0969da}
footer{color:#57606a;font-size:12px;padding:0 24px 16px}
"""


def _time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _badge(ok: bool, yes: str, no: str) -> str:
    return f'<span class="badge {"ok" if ok else "bad"}">{escape(yes if ok else no)}</span>'


def _checks(checks: dict[str, Check]) -> str:
    rows = "".join(
        f'<tr class="check {"ok" if c.ok else "bad"}" data-check="{escape(name)}">'
        f"<td>{escape(name)}</td><td>{_badge(c.ok, 'ok', 'failing')}</td>"
        f"<td>{escape(c.detail)}</td></tr>"
        for name, c in checks.items()
    )
    return (
        '<section id="checks"><h2>Readiness</h2><table><thead><tr><th>check</th><th>state</th>'
        f"<th>detail</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _backend(services: Services) -> str:
    settings = services.settings
    exchange = services.exchange
    items: list[tuple[str, str, str]] = [("backend", "backend", settings.backend)]
    error = ""
    # Imported here: the remote and simulated backends never load the local one (~15 ms).
    from ..exchange.local.backend import LocalExchange

    if isinstance(exchange, LocalExchange):
        status = exchange.pool.status()
        items += [
            ("pool size", "hosts-size", str(status.size)),
            ("warm", "hosts-warm", str(status.warm)),
            ("busy", "hosts-busy", str(status.busy)),
            ("starting", "hosts-starting", str(status.starting)),
            ("broken", "hosts-broken", str(status.broken)),
            ("waiting requests", "hosts-waiting", str(status.waiting)),
            (
                "hosts started / failed to start",
                "hosts-starts",
                f"{status.starts} / {status.failed_starts}",
            ),
        ]
        if status.last_startup_error:
            error = (
                "<h2>Last startup error, and what to do</h2>"
                f'<div class="error" id="startup-error">{escape(status.last_startup_error)}</div>'
            )
    elif settings.backend == "remote":
        remote = settings.remote
        scheme = "https" if remote.ssl else "http"
        port = remote.port or (443 if remote.ssl else 80)
        items += [
            ("endpoint", "remote-endpoint", f"{scheme}://{remote.server}:{port}/{remote.path}"),
            ("authentication", "remote-auth", remote.auth),
        ]
    items.append(("mailbox kind", "mailbox-kind", settings.mailbox_kind))
    rows = "".join(
        f'<dt>{escape(label)}</dt><dd id="{key}">{escape(value)}</dd>'
        for label, key, value in items
    )
    return f'<section id="backend"><h2>Backend</h2><dl>{rows}</dl>{error}</section>'


def _counts(counts: list[tuple[str, str | None, int]]) -> str:
    if not counts:
        body = '<p class="empty">No requests in the last 24 hours.</p>'
    else:
        rows = "".join(
            f'<tr><td class="state-{escape(state)}">{escape(state)}</td>'
            f"<td>{escape(code or '')}</td><td>{count}</td></tr>"
            for state, code, count in counts
        )
        body = (
            "<table><thead><tr><th>outcome</th><th>code</th><th>requests</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    return f'<section id="counts"><h2>Last 24 hours</h2>{body}</section>'


def _record_link(base: str, record: Record) -> str:
    href = f"{base}/api/v1/requests?request_id={quote(record.request_id, safe='')}"
    return f'<a href="{escape(href)}">{escape(record.request_id)}</a>'


def _fix(record: Record) -> str:
    """The advice for the record's code when its detail is Exchange's text, not our sentence."""
    advice = advice_for_code(record.code) if record.code else None
    if not advice or (record.detail and advice in record.detail):
        return ""
    return f'<span class="fix">{escape(advice)}</span>'


def _failures(base: str, records: Iterable[Record]) -> str:
    failed = [r for r in records if r.state in _FAILED_STATES][:FAILURES]
    if not failed:
        body = '<p class="empty">No failures in the last 24 hours.</p>'
    else:
        body = "".join(
            f'<div class="error failure"><strong>{escape(r.code or r.state)}</strong> '
            f"{_time(r.received_at)} UTC · {escape(r.identity)} · {_record_link(base, r)}\n"
            f"{escape(r.detail or '')}{_fix(r)}</div>"
            for r in failed
        )
    return f'<section id="failures" class="wide"><h2>Failures and their fix</h2>{body}</section>'


def _requests(base: str, records: list[Record]) -> str:
    if not records:
        body = '<p class="empty" id="empty">No requests in the journal yet.</p>'
    else:
        rows = "".join(
            f'<tr class="request"><td>{_time(r.received_at)}</td><td>{escape(r.caller)}</td>'
            f"<td>{escape(r.identity)}</td>"
            f'<td class="state-{escape(r.state)}">{escape(r.state)}</td>'
            f"<td>{escape(r.code or '')}</td>"
            f"<td>{'' if r.duration_ms is None else f'{r.duration_ms} ms'}</td>"
            f"<td>{_record_link(base, r)}</td></tr>"
            for r in records
        )
        body = (
            "<table><thead><tr><th>time (UTC)</th><th>caller</th><th>identity</th>"
            "<th>outcome</th><th>code</th><th>duration</th><th>journal record</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    return f'<section id="requests" class="wide"><h2>Last {RECENT} requests</h2>{body}</section>'


def render(services: Services, checks: dict[str, Check]) -> str:
    """The whole page; every value from the journal or the backend is HTML-escaped."""
    base = services.settings.base_path
    journal = services.journal
    recent: list[Record] = []
    counts: list[tuple[str, str | None, int]] = []
    day: list[Record] = []
    if journal is not None and checks.get("journal", Check(ok=True, detail="")).ok:
        since = journal.now() - DAY_SECONDS
        recent = journal.page(limit=RECENT)
        counts = journal.outcome_counts(since)
        day = journal.page(since=since, limit=500)
    ready = all(check.ok for check in checks.values())
    now = datetime.now(tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>VezaProvisioner status: {'ready' if ready else 'NOT READY'}</title>"
        f"<style>{_CSS}</style></head><body>"
        f'<header class="{"ok" if ready else "bad"}"><h1>VezaProvisioner</h1>'
        f'<span id="overall">{_badge(ready, "Ready", "Not ready")}</span>'
        f'<span class="meta">version {escape(__version__)} · backend '
        f"{escape(services.settings.backend)} · {escape(base)}</span></header>"
        f"<main>{_checks(checks)}{_backend(services)}{_counts(counts)}"
        f"{_failures(base, day)}{_requests(base, recent)}</main>"
        f"<footer>Rendered {now} UTC; this page refreshes itself every {REFRESH_SECONDS} s. "
        f'The same data as JSON: <a href="{escape(base)}/health/ready">readiness</a>, '
        f'<a href="{escape(base)}/api/v1/requests">requests</a>.</footer>'
        "</body></html>"
    )
