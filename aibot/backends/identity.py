"""Which entry of a server's catalogue a configured model name denotes: the one place where aibot's
names meet the server's.

Jobs, slots and model rows are keyed by the name the configuration gives (the original's
`<base>@<quant>`, e.g. `the-eternal@f16`); each server names the same model its own way (LM Studio's
key `the-eternal` with variant `the-eternal@f16`, Ollama's `the-eternal-f16:latest`, a router preset).
Refresh, loader, placement and the claim path all go through `locate`, so a naming difference can
never make one of them forget a model another one loaded.

Two steps: the configured name is first rewritten into the server kind's own template (a config
written for LM Studio, `<base>@<quant>`, names `<base>-<quant>` on Ollama and llama.cpp: see
aibot/config/modelid.py), then the backend's `identify` applies that kind's matching rules to each
candidate, the name as written first.
"""

from __future__ import annotations

from aibot.backends.base import Backend, Catalogue, Offered, unknown_model


def candidates(wanted: str, template: str | None) -> list[str]:
    """The configured name, then its rewrite into `template` when it is written `<base>@<quant>`."""
    out = [wanted]
    if template and "@" in wanted:
        base, _, quant = wanted.rpartition("@")
        if base and quant:
            rewritten = template.format(base=base, quant=quant)
            if rewritten not in out:
                out.append(rewritten)
    return out


def identify(backend: Backend, wanted: str, catalogue: Catalogue) -> Offered | None:
    """The entry `wanted` denotes on this server, or None (pure; no HTTP)."""
    match = getattr(backend, "identify", None) or _exact
    for name in candidates(wanted, getattr(backend, "model_id_template", None)):
        found = match(name, catalogue)
        if found is not None:
            return found
    return None


def _exact(name: str, catalogue: Catalogue) -> Offered | None:
    return next((m for m in catalogue.models if name in m.all_names()), None)


def locate(backend: Backend, wanted: str, catalogue: Catalogue, where: str) -> Offered:
    """Like `identify`, but an unknown name on a complete catalogue raises ModelUnavailable listing
    the names the server does offer (and a name on an incomplete one is returned to be tried)."""
    found = identify(backend, wanted, catalogue)
    if found is not None:
        return found
    if not catalogue.complete:
        return Offered(wanted)
    raise unknown_model(wanted, catalogue, where)


def catalogue_of(backend: Backend) -> Catalogue:
    """The backend's catalogue; a backend without `catalogue()` lists only loaded models (incomplete)."""
    if hasattr(backend, "catalogue"):
        return backend.catalogue()
    return Catalogue(tuple(Offered(m.key, status=m.state, size_bytes=m.size_bytes or None, instances=(m,))
                           for m in backend.list_loaded()), complete=False)
