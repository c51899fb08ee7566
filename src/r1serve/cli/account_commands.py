"""`r1serve keys` and `r1serve usage`: the platform's keys and ledger from the host, in prose
and tables for people and JSON (`--json`) for scripts."""
from __future__ import annotations

import datetime as dt
import json

from r1serve.errors import InvalidRequestError
from r1serve.accounts.accounts import Accounts
from r1serve.accounts.api_keys import KeyInfo


def limit(value: str | None) -> int | None:
    # "none" removes a limit on update; a number sets it.
    if value is None or value.lower() in ("none", "unlimited"):
        return None
    if not value.isdigit():
        raise InvalidRequestError(f"{value!r} is not a limit; give a whole number >= 0, or 'none'")
    return int(value)


def _shown(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _limits(k: KeyInfo) -> str:
    return f"quota {_shown(k.quota_tokens)} tokens ({k.used_tokens} used), rpm {_shown(k.rpm)}, tpm {_shown(k.tpm)}"


def run_keys(args, accounts: Accounts) -> None:
    command = args.keys_command
    if command == "create":
        info, secret = accounts.keys.create(args.name, limit(args.quota_tokens), limit(args.rpm), limit(args.tpm),
                                          args.admin)
        if args.json:
            print(json.dumps(info.public() | {"key": secret}))
        else:
            print(f"created {info.id} ({info.name}): {_limits(info)}. The secret is shown only now; keep it safe:\n"
                  f"{secret}")
        return
    if command == "list":
        _print_keys(accounts.keys.list(args.all), args.json)
        return
    if command == "revoke":
        info = accounts.keys.revoke(args.key_id)
        said = f"revoked {info.id} ({info.name}): every server sharing this database refuses it from its next request"
    else:
        limits = {name: limit(getattr(args, name)) for name in ("quota_tokens", "rpm", "tpm")
                  if getattr(args, name) is not None}
        info = accounts.keys.update(args.key_id, **limits)
        said = f"updated {info.id} ({info.name}): {_limits(info)}"
    print(json.dumps(info.public()) if args.json else said)


def _print_keys(keys: list[KeyInfo], as_json: bool) -> None:
    if as_json:
        print(json.dumps([k.public() for k in keys], indent=2))
        return
    print(f"{'id':18} {'name':16} {'admin':5} {'quota':>12} {'used':>12} {'rpm':>9} {'tpm':>9} revoked")
    for k in keys:
        print(f"{k.id:18} {k.name[:16]:16} {'yes' if k.is_admin else '':5} {_shown(k.quota_tokens):>12} "
              f"{k.used_tokens:>12} {_shown(k.rpm):>9} {_shown(k.tpm):>9} {'yes' if k.revoked else ''}")


def key_id(accounts: Accounts, given: str) -> str:
    """A key's id from its id or its name (names need not be unique: then the ids are asked for)."""
    keys = accounts.keys.list(include_revoked=True)
    if any(k.id == given for k in keys):
        return given
    named = [k.id for k in keys if k.name == given]
    if len(named) == 1:
        return named[0]
    if named:
        raise InvalidRequestError(f"{len(named)} keys are named {given!r} ({', '.join(named)}); give an id")
    raise InvalidRequestError(f"no API key with id or name {given!r}; `r1serve keys list --all` shows them")


def run_usage(args, accounts: Accounts) -> None:
    try:
        since = dt.date.fromisoformat(args.since) if args.since else None
    except ValueError:
        raise InvalidRequestError(f"--since {args.since!r} is not a date; use YYYY-MM-DD") from None
    key = key_id(accounts, args.key) if args.key else None
    rows = accounts.ledger.summary(key, since, None, (args.by,))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    names = {k.id: f"{k.name} ({k.id})" for k in accounts.keys.list(include_revoked=True)}
    print(f"{args.by:32} {'requests':>9} {'prompt':>10} {'cached':>9} {'completion':>11} {'reasoning':>10} "
          f"{'charged':>10} {'cost':>12}")
    for r in rows:
        group = names.get(r["key"], "no key (open server)") if args.by == "key" else str(r[args.by])
        print(f"{group[:32]:32} {r['requests']:>9} {r['prompt_tokens']:>10} {r['cached_tokens']:>9} "
              f"{r['completion_tokens']:>11} {r['reasoning_tokens']:>10} {r['charged_tokens']:>10} "
              f"{r['cost']:>8.4f} {r['currency']}")
