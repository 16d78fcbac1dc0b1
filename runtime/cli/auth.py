"""``wattserve auth new-key``: make an API key and the keys-file line that holds only its digest."""

from __future__ import annotations

import sys


def cmd_new_key(args) -> int:
    from ..security.keys import key_line, new_key

    key = new_key()
    line = key_line(args.role, args.name, key)
    if args.append:
        with open(args.append, "a") as f:
            f.write(line + "\n")
        print(f"appended to {args.append}: {line}", file=sys.stderr)
    else:
        print(f"keys-file line (the server needs only this): {line}", file=sys.stderr)
    # The key itself goes to stdout once, for the caller to hand over; the server never sees it.
    print(key)
    return 0


def register(sub) -> None:
    auth = sub.add_parser("auth", help="API keys").add_subparsers(dest="auth_command", required=True)
    s = auth.add_parser("new-key", help="print a new API key (stdout) and its keys-file line (stderr)")
    s.add_argument("role", choices=["client", "operator"], help="client: bound to a tenant; operator: the Admin API")
    s.add_argument("name", help="the tenant (client keys) or the operator's name (recorded in budget changes)")
    s.add_argument("--append", metavar="KEYS_FILE", help="append the digest line to this keys file")
    s.set_defaults(func=cmd_new_key)
