"""The text `aibot config check` prints: errors, warnings, then what the config describes.

Kept separate from the CLI so the same report can be logged by the hot-reload store or shown by a
future dashboard endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from aibot.cli.render import Column, to_text
from aibot.cli.render import table as render_table
from aibot.config.issues import Issue, short_repr
from aibot.config.loader import LoadResult
from aibot.config.modelid import UnresolvableModel, resolve_model_id
from aibot.config.models import GB, BotConfig


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, max_width: int = 70) -> list[str]:
    """Left-aligned columns (the CLI's plain table); long cells but the last are cut so one row stays one line."""
    last = len(headers) - 1
    columns = [Column(str(i), h, max_width=max_width if i < last else 10_000, align="l") for i, h in enumerate(headers)]
    view = render_table([{str(i): c for i, c in enumerate(row)} for row in rows], columns, empty="(none)")
    return to_text(view).rstrip("\n").splitlines()


def _issue_rows(issues: Sequence[Issue]) -> list[list[str]]:
    return [[i.path or "<root>", "" if i.value is None else short_repr(i.value, 40), i.message] for i in issues]


def _model_cell(config: BotConfig, entity) -> str:
    """The model id as each kind of configured server names it (one id when they agree)."""
    kinds = sorted({s.kind for s in config.servers if s.enabled}) or ["lmstudio"]
    try:
        ids = {kind: resolve_model_id(entity, kind) for kind in kinds}
    except UnresolvableModel:
        return "(none)"
    if len(set(ids.values())) == 1:
        return next(iter(ids.values()))
    return "; ".join(f"{model} ({kind})" for kind, model in ids.items())


def _limits(entity) -> str:
    rl = entity.rate_limits
    if rl is None:
        return "unlimited"
    parts = []
    if rl.min_seconds_between_posts is not None:
        parts.append(f"{rl.min_seconds_between_posts:g}s apart")
    if rl.max_posts_per_minute is not None:
        parts.append(f"{rl.max_posts_per_minute}/min")
    if rl.max_posts_per_hour is not None:
        parts.append(f"{rl.max_posts_per_hour}/h")
    return ", ".join(parts) or "unlimited"


def format_report(result: LoadResult) -> str:
    lines = [f"config: {result.source} ({result.form})"]
    if result.errors:
        lines += ["", f"ERRORS ({len(result.errors)})"] + table(("PATH", "VALUE", "PROBLEM"), _issue_rows(result.errors))
    if result.warnings:
        lines += ["", f"WARNINGS ({len(result.warnings)})"] + table(("PATH", "VALUE", "NOTE"),
                                                                   _issue_rows(result.warnings))
    config = result.config
    if config is not None:
        enabled = sum(e.enabled for e in config.entities)
        lines += ["", f"version {config.version}; escapes: {config.escape_mode}; "
                      f"default priority {config.queue_settings.default_priority}"]
        lines += ["", f"ENTITIES ({len(config.entities)}, {enabled} enabled)"]
        rows = [[e.id, "yes" if e.enabled else "no", e.username, _model_cell(config, e),
                 str(config.default_priority_for(e)), _limits(e), e.prompt_mode] for e in config.entities]
        lines += table(("ID", "ENABLED", "USERNAME", "MODEL", "PRIORITY", "RATE LIMITS", "PROMPT"), rows)
        lines += ["", f"SERVERS ({len(config.servers)}, {sum(s.enabled for s in config.servers)} enabled)"]
        rows = [[s.name or "", s.kind, s.url or "", "yes" if s.enabled else "no",
                 "?" if s.memory_bytes is None else f"{s.memory_bytes / GB:g} GB",
                 str(s.hard_cap), s.token_env or "-"] for s in config.servers]
        lines += table(("NAME", "KIND", "URL", "ENABLED", "MEMORY", "CAP", "TOKEN ENV"), rows)
    elif result.raw is not None and isinstance(result.raw.get("entities"), list):
        lines += ["", f"({len(result.raw['entities'])} entities in the file; fix the errors to see the summary)"]
    verdict = "INVALID" if result.errors else "OK"
    lines += ["", f"{verdict}: {len(result.errors)} error(s), {len(result.warnings)} warning(s)"]
    return "\n".join(lines)
