"""Bearer tokens for the lineage API, each with `read` and/or `write` scopes.

Where the server finds them (all are merged):
    FLASHOPS_LINEAGE_TOKENS="tokenA:read,tokenB:read+write"     entries split by commas or newlines
    FLASHOPS_LINEAGE_TOKENS_FILE=/etc/flashops/tokens            the same format in a file (a mounted Secret key),
                                                                 or a directory: every file in it is read
    FLASHOPS_LINEAGE_TOKEN=tok                                   one read+write token (what the Helm chart sets)
No token, no access: every endpoint except /healthz needs one.
"""
from __future__ import annotations

import hmac
import os
import re
from pathlib import Path
from typing import Mapping

SCOPES = ("read", "write")
Tokens = dict[str, frozenset[str]]


class TokenConfigError(ValueError):
    pass


def parse_tokens(text: str, source: str = "FLASHOPS_LINEAGE_TOKENS") -> Tokens:
    tokens: Tokens = {}
    for entry in filter(None, (e.strip() for e in re.split(r"[,\n]", text))):
        token, sep, scopes = entry.rpartition(":")
        if not sep or not token:
            raise TokenConfigError(f"{source}: entry '{_mask(entry)}' has no scopes: write TOKEN:read or TOKEN:read+write")
        wanted = frozenset(s.strip() for s in scopes.split("+"))
        bad = sorted(wanted - set(SCOPES))
        if bad:
            raise TokenConfigError(f"{source}: token '{_mask(token)}' has unknown scope(s) {', '.join(bad)}: "
                                   f"use {' or '.join(SCOPES)}, joined by '+'")
        tokens[token] = tokens.get(token, frozenset()) | wanted
    return tokens


def load_tokens(env: Mapping[str, str] | None = None) -> Tokens:
    env = os.environ if env is None else env
    tokens: Tokens = {}
    if env.get("FLASHOPS_LINEAGE_TOKENS"):
        tokens.update(parse_tokens(env["FLASHOPS_LINEAGE_TOKENS"]))
    if env.get("FLASHOPS_LINEAGE_TOKENS_FILE"):
        path = Path(env["FLASHOPS_LINEAGE_TOKENS_FILE"])
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
        for f in files:
            try:
                text = f.read_text()
            except OSError as e:
                raise TokenConfigError(f"FLASHOPS_LINEAGE_TOKENS_FILE: cannot read {f}: {e.strerror}") from None
            for token, scopes in parse_tokens(text, str(f)).items():
                tokens[token] = tokens.get(token, frozenset()) | scopes
    single = (env.get("FLASHOPS_LINEAGE_TOKEN") or "").strip()
    if single:
        tokens[single] = frozenset(SCOPES)
    return tokens


def scopes_of(tokens: Tokens, presented: str) -> frozenset[str] | None:
    """The scopes of a presented token, compared in constant time; None when it is unknown."""
    found = None
    for token, scopes in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = scopes
    return found


def _mask(token: str) -> str:
    return token[:3] + "..." if len(token) > 6 else "***"
