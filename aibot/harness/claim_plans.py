"""The plans a claim really runs, for the claim-plan test and the scaling benchmark.

Why here: the claim's statements live inside the plpgsql function aibot.claim_jobs, so a check that
the claim walks its indexes must capture what the installed function executes (auto_explain), or read
its statements from pg_proc.prosrc where Postgres has no contrib (the embedded pgserver) — never a copy
of the SQL that could drift. One implementation serves tests/queue/test_claim_plan.py and
bench/scaling.py. Production code never imports this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from aibot import db


CANDIDATE_MARK = "ORDER BY j.rank, j.id"


def _plan_nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def _has_auto_explain(url: str) -> bool:
    with db.connect(url, autocommit=True) as conn:
        try:
            conn.execute("LOAD 'auto_explain'")
        except (psycopg.errors.UndefinedFile, psycopg.errors.InsufficientPrivilege):
            return False
    return True


def claim_plans(url: str, *, claim: Callable[[psycopg.Connection], Any], calls: int = 8,
                use_slots: bool = True) -> list[dict]:
    """The plans a claim really runs: [{"query": text, "plan": EXPLAIN JSON plan, "how": ...}].

    With auto_explain (a Postgres with contrib, as the shared one), `claim(conn)` runs `calls` times
    (more than plpgsql's five custom plans, so a cached generic plan shows too) and every nested
    statement's plan is logged to this session: whatever claim_jobs executes, however it is rewritten.
    Without it (pgserver has no contrib), the candidate and slot-choice statements are read from the
    installed function's source and explained with custom and generic plans (as
    tests/queue/test_claim_plan.py does); their plpgsql variables become parameters.
    The claims made here stay claimed: the caller gives them back.
    """
    if _has_auto_explain(url):
        return _logged_claim_plans(url, claim, calls)
    return _explained_claim_plans(url, use_slots)


def _logged_claim_plans(url: str, claim: Callable[[psycopg.Connection], Any], calls: int) -> list[dict]:
    logged: list[str] = []
    with db.connect(url, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: logged.append(diag.message_primary or ""))
        for stmt in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                     "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_format = 'json'",
                     "SET client_min_messages = log"):
            conn.execute(stmt)
        for _ in range(calls):
            claim(conn)
        conn.execute("SET client_min_messages = notice")
    out = []
    for message in logged:
        start = message.find("{")
        if start < 0:
            continue
        doc = json.loads(message[start:])
        query = doc.get("Query Text", "")
        if query.lstrip().upper().startswith(("SET ", "LOAD ")):
            continue
        out.append({"query": query, "plan": doc["Plan"], "how": "auto_explain"})
    return out


def _claim_statements(src: str) -> dict[str, tuple[str, str]]:
    """name -> (PREPARE parameter types, statement) for the servable-models read ("servable"), the
    candidate statements (the slot-aware walk per model, "candidate", and the walk without slots,
    "candidate_no_slots") and the slot choice's two reads ("slot_sample", "slot_choice"). The function's
    CONSTANTs are replaced by their values."""
    for name, value in re.findall(r"\b(c_\w+)\s+CONSTANT\s+\w+\s*:=\s*(\d+)\s*;", src):
        src = re.sub(rf"\b{name}\b(?!\s+CONSTANT)", value, src)
    found: dict[str, tuple[str, str]] = {}
    params = {"candidate": (("v_models", "$1::text[]"), ("v_free", "$2::integer[]"), ("p_max_scan", "$3::integer"),
                            ("p_limit", "$4::integer")),
              "candidate_no_slots": (("p_max_scan", "$1::integer"),)}
    types = {"candidate": "text[], integer[], integer, integer", "candidate_no_slots": "integer"}
    for stmt in re.findall(r"OPEN v_cur FOR\s+(SELECT.*?);", src, re.S):
        if CANDIDATE_MARK not in stmt:
            continue
        name = "candidate" if "v_models" in stmt else "candidate_no_slots"
        for var, param in params[name]:
            stmt = re.sub(rf"\b{var}\b", param, stmt)
        found[name] = (types[name], stmt)
    m = re.search(r"SELECT\s+(coalesce\(array_agg\(f\.model\).*?)\s+INTO\s+v_models,\s*v_free\s+(FROM.*?);", src, re.S)
    if m:
        found["servable"] = ("", f"SELECT {m.group(1)} {m.group(2)}")
    m = re.search(r"FOR\s+v_pick\s+IN\s+(SELECT.*?)\s+LOOP", src, re.S)
    if m:
        found["slot_sample"] = ("text", m.group(1).replace("v_cand.model", "$1::text"))
    m = re.search(r"(SELECT\s+sl\.id,\s*sl\.server_id)\s+INTO\s+v_slot,\s*v_server\s+(FROM.*?SKIP LOCKED);", src, re.S)
    if m:
        found["slot_choice"] = ("text, integer", (m.group(1) + " " + m.group(2))
                                .replace("v_cand.model", "$1::text").replace("v_pick.server_id", "$2::integer"))
    return found


def _explained_claim_plans(url: str, use_slots: bool = True) -> list[dict]:
    from aibot.queue import jobs

    out = []
    with db.connect(url, autocommit=True) as conn:
        src = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'claim_jobs'").fetchone()["prosrc"]
        stmts = _claim_statements(src)
        servable = stmts.get("servable")
        models, free = (conn.cursor(row_factory=tuple_row).execute(servable[1]).fetchone() if servable else ([], []))
        sample = stmts.get("slot_sample")
        server = (conn.execute(sample[1].replace("$1::text", "%s"), (models[0],)).fetchone() or {}).get("server_id") \
            if sample and models else None
        args = {"servable": (),
                "candidate": (models, free, jobs.DEFAULT_MAX_SCAN, 1),
                "candidate_no_slots": (jobs.DEFAULT_MAX_SCAN,),
                "slot_sample": (models[0] if models else "none",),
                "slot_choice": (models[0] if models else "none", server or 0)}
        wanted = {"servable", "candidate", "slot_sample", "slot_choice"} if use_slots else {"candidate_no_slots"}
        stmts = {name: stmt for name, stmt in stmts.items() if name in wanted}
        client = psycopg.ClientCursor(conn)   # utility statements take no protocol-level parameters
        for name, (types, stmt) in stmts.items():
            client.execute(f"PREPARE scaling_{name}{f'({types})' if types else ''} AS {stmt}")
            marks = f"({', '.join(['%s'] * len(args[name]))})" if args[name] else ""
            for mode in ("force_custom_plan", "force_generic_plan"):
                conn.execute(f"SET plan_cache_mode = {mode}")
                with conn.transaction():
                    row = client.execute(f"EXPLAIN (FORMAT JSON) EXECUTE scaling_{name}{marks}", args[name]).fetchone()
                (doc,) = row.values()
                doc = json.loads(doc) if isinstance(doc, str) else doc
                out.append({"query": stmt, "plan": doc[0]["Plan"], "how": f"prosrc {name} {mode}"})
            conn.execute(f"DEALLOCATE scaling_{name}")
        conn.execute("RESET plan_cache_mode")
    missing = wanted - set(stmts)
    if missing:
        out.append({"query": f"(not found in claim_jobs source: {', '.join(sorted(missing))})", "plan": {},
                    "how": "prosrc"})
    return out


def plan_verdict(plans: list[dict], tables: Sequence[str] = ("jobs", "slots")) -> dict[str, Any]:
    """ok = at least one plan and no Seq Scan of `tables`; the scans of each distinct statement."""
    statements: dict[str, set[str]] = {}
    seq: set[str] = set()
    for p in plans:
        head = " ".join(p["query"].split())[:120]
        scans = statements.setdefault(head, set())
        for n in _plan_nodes(p["plan"]) if p["plan"] else ():
            rel = n.get("Relation Name")
            if not rel:
                continue
            scans.add(f"{n['Node Type']} {rel}" + (f" using {n['Index Name']}" if n.get("Index Name") else ""))
            if n["Node Type"] == "Seq Scan" and rel in tables:
                seq.add(rel)
    how = sorted({p["how"].split()[0] for p in plans})
    return {"ok": bool(plans) and not seq and all(p["plan"] for p in plans), "seq_scans": sorted(seq), "how": how,
            "statements": [{"query": q, "scans": sorted(s)} for q, s in statements.items()]}
