"""Ollama's model-name grammar: which strings denote the same installed model.

A port of ollama/ollama `types/model/name.go` @fb30760996871fa9460115c753afd2c60d4ab0f7 (v0.33.0-rc2),
used by the backend's `identify` and by the simulator's Ollama flavour, so that both follow the
server's rules and not ours. Its cases are pinned by `tests/fixtures/ollama/name_cases.json`, copied
from that file's own tests (`types/model/name_test.go`).

- A name is `[host/][namespace/]model[:tag]`; the tag is cut at the last `:` after the last `/`
  (`ParseNameBare`). Missing parts default to `registry.ollama.ai`, `library` and `latest`
  (`DefaultName`, `ParseName`), so `x`, `x:latest`, `library/x` and `registry.ollama.ai/library/x:latest`
  are one model, while `x:q4` and `sim/x` are others.
- Parts compare case-insensitively: `Name.EqualFold`, and `getExistingName` in `server/routes.go`
  rewrites each requested part to the case of an installed one with `strings.EqualFold`.
- The server lists names in `DisplayShortest` form (`/api/tags`: `server/model_list_cache.go`
  `buildModelListSummary`; `/api/ps`: `server/routes.go` `PsHandler`): default host and namespace
  left out, the tag always shown (`x:latest`, `sim/x:latest`).
- A request's name is trimmed and may carry a `:local` source suffix (`internal/modelref/modelref.go`
  `ParseRef`), which names the same local model; `:cloud` names a remote one.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MISSING = "!MISSING!"   # name.go MissingPart: a part promised by a separator but empty


@dataclass(frozen=True)
class Name:
    host: str = ""
    namespace: str = ""
    model: str = ""
    tag: str = ""

    def is_valid(self) -> bool:
        """`Name.IsFullyQualified`: all four parts present and well-formed."""
        return (_valid_part("host", self.host) and _valid_part("namespace", self.namespace)
                and _valid_part("model", self.model) and _valid_part("tag", self.tag))

    def display_shortest(self) -> str:
        """`Name.DisplayShortest`, the form `/api/tags` and `/api/ps` report."""
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}"

    def __str__(self) -> str:
        """`Name.String`: the parts that are set, joined."""
        out = "".join(f"{p}/" for p in (self.host, self.namespace) if p) + self.model
        return f"{out}:{self.tag}" if self.tag else out

    def fold(self) -> tuple[str, str, str, str]:
        """The identity `Name.EqualFold` compares."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())


def parse_bare(s: str) -> Name:
    """`ParseNameBare`: the parts as written, no defaults (the protocol scheme is dropped)."""
    tag = ""
    if s.rfind(":") > s.rfind("/"):
        s, tag = _cut_promised(s, ":")
    before, model, promised = _cut_last(s, "/")
    if not promised:
        return Name(model=s, tag=tag)
    s, model = before or MISSING, model or MISSING
    before, namespace, promised = _cut_last(s, "/")
    if not promised:
        return Name(namespace=s, model=model, tag=tag)
    s, namespace = before or MISSING, namespace or MISSING
    _, sep, host = s.partition("://")
    return Name(host=host if sep else s, namespace=namespace, model=model, tag=tag)


def parse(s: str) -> Name:
    """`ParseName`: the bare parts merged with `DefaultName` (empty parts take the defaults)."""
    n = parse_bare(s)
    return Name(host=n.host or DEFAULT_HOST, namespace=n.namespace or DEFAULT_NAMESPACE, model=n.model,
                tag=n.tag or DEFAULT_TAG)


def parse_request(raw: str) -> Name | None:
    """The model a request's `model` field names, or None where Ollama refuses it as invalid
    (`parseAndValidateModelRef` in `server/model_resolver.go`) or it names a cloud model."""
    s = raw.strip()
    idx = s.rfind(":")
    if idx >= 0:
        suffix = s[idx + 1:].strip().lower()
        if suffix == "cloud":
            return None
        if suffix == "local":
            s = s[:idx]
    if not s:
        return None
    n = parse(s)
    return n if n.is_valid() else None


def equivalents(listed: str) -> tuple[str, ...]:
    """Other spellings of the listed name `listed` that Ollama resolves to the same model, shortest
    first: the tag left out when it is `latest`, the default namespace and host written out."""
    n = parse(listed)
    if not n.is_valid():
        return ()
    tags = [f":{n.tag}"] + ([""] if n.tag.lower() == DEFAULT_TAG else [])
    if n.host.lower() != DEFAULT_HOST:
        prefixes = [f"{n.host}/{n.namespace}/"]
    elif n.namespace.lower() != DEFAULT_NAMESPACE:
        prefixes = [f"{n.namespace}/", f"{n.host}/{n.namespace}/"]
    else:
        prefixes = ["", f"{n.namespace}/", f"{n.host}/{n.namespace}/"]
    forms = dict.fromkeys(f"{p}{n.model}{t}" for p in prefixes for t in tags)
    return tuple(sorted((f for f in forms if f != listed), key=len))


def _cut_last(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    return (s[:i], s[i + len(sep):], True) if i >= 0 else (s, "", False)


def _cut_promised(s: str, sep: str) -> tuple[str, str]:
    before, after, _ = _cut_last(s, sep)
    return before or MISSING, after or MISSING


_LIMITS = {"host": 350}


def _valid_part(kind: str, s: str) -> bool:
    """`isValidPart`: 1..80 characters (host 350), starting with [A-Za-z0-9_], then also `-` and `_`;
    `.` except in a namespace; `:` only in a host."""
    if not 1 <= len(s) <= _LIMITS.get(kind, 80):
        return False
    for i, c in enumerate(s):
        if c.isascii() and (c.isalnum() or c == "_"):
            continue
        if i == 0:
            return False
        if c == "-" or (c == "." and kind != "namespace") or (c == ":" and kind == "host"):
            continue
        return False
    return True
