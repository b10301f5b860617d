"""`aibot config check --live`: what the configured servers say about the configured models.

A config can be valid and still name models no server offers (LM Studio lists `the-eternal` with the
variant `the-eternal@f16`, Ollama `the-eternal-f16:latest`): the loader would then find out one
refusal at a time. This asks every enabled server for its catalogue once and matches every model the
entities resolve to with that server kind's identity rules (`aibot.backends.identity`), the same
function the refresh and the loader use, so what it reports is what they will do.
"""

from __future__ import annotations

from dataclasses import dataclass

from aibot.backends import identity
from aibot.backends.base import BackendError
from aibot.config.modelid import configured_model_ids


@dataclass(frozen=True)
class Finding:
    model: str
    server: str
    status: str          # loaded | offered | not offered | unknown (incomplete listing) | unreachable
    detail: str


def check_live(config, backend_for) -> list[Finding]:
    """One finding per (configured model, enabled server). `backend_for(server_config)` builds the
    backend (its token from the environment); a server that cannot be asked is one finding per model."""
    models = sorted(configured_model_ids(config))
    findings: list[Finding] = []
    for server in config.servers:
        if not server.enabled:
            continue
        try:
            backend = backend_for(server)
        except ValueError as exc:
            findings += [Finding(m, server.name, "unreachable", str(exc)) for m in models]
            continue
        try:
            catalogue = identity.catalogue_of(backend)
        except BackendError as exc:
            findings += [Finding(m, server.name, "unreachable", f"{type(exc).__name__}: {exc}") for m in models]
            backend.close()
            continue
        try:
            for model in models:
                findings.append(_finding(backend, model, server.name, catalogue))
        finally:
            backend.close()
    return findings


def _finding(backend, model: str, server: str, catalogue) -> Finding:
    offered = identity.identify(backend, model, catalogue)
    if offered is None:
        if not catalogue.complete:
            return Finding(model, server, "unknown", "the server lists only loaded models; a load will tell")
        names = catalogue.names()
        shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
        return Finding(model, server, "not offered", f"it offers: {shown or 'nothing'}")
    live = [i for i in offered.instances if i.state in ("loaded", "loading", "sleeping")]
    if live:
        names = ", ".join(f"{i.key} ({i.state}, parallel {i.parallel}, context {i.context_length or '?'})"
                          for i in live)
        return Finding(model, server, "loaded", f"as {names}")
    if offered.status == "failed":
        return Finding(model, server, "offered", f"as {offered.key}; its last load FAILED: {offered.failure}")
    return Finding(model, server, "offered", f"as {offered.key}" + (f" ({offered.detail})" if offered.detail else ""))


def unserved(findings: list[Finding]) -> list[str]:
    """Configured models that no reachable server offers (the check fails on these)."""
    ok = {f.model for f in findings if f.status in ("loaded", "offered", "unknown")}
    return sorted({f.model for f in findings} - ok)
