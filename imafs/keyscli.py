"""``imafs keys``: the emulated keyrings of a mount (add, list, blacklist)."""

from __future__ import annotations

import json
import os


def cmd_keys_add(args) -> int:
    from .cli import _client
    answer = _client(args).call("keys_add", keyring=args.keyring, cert=os.path.abspath(args.cert))
    print(f"{answer['keyring']} {answer['id']} {answer['subject']}: {answer['decision']}")
    return 0


def cmd_keys_list(args) -> int:
    from .cli import _client
    answer = _client(args).call("keys_list")
    if args.json:
        print(json.dumps({"keys": answer["keys"], "blacklist": answer["blacklist"]}, indent=2))
        return 0
    rows = [(k["keyring"], k["id"], k["subject"]) for k in answer["keys"]]
    rows += [(".blacklist", "-", entry) for entry in answer["blacklist"]]
    width = max([len("KEYRING")] + [len(r[0]) for r in rows])
    print(f"{'KEYRING':<{width}}  {'ID':<8}  SUBJECT")
    for ring, key_id, subject in rows:
        print(f"{ring:<{width}}  {key_id:<8}  {subject}")
    return 0


def cmd_keys_blacklist(args) -> int:
    from .cli import _client
    print(_client(args).call("keys_blacklist", entry=args.entry)["entry"])
    return 0


def add_parser(sub, with_mount) -> None:
    k = sub.add_parser("keys", help="the emulated keyrings (.ima, .builtin_trusted_keys, .machine, .blacklist)")
    verbs = k.add_subparsers(dest="keys_command", required=True, metavar="VERB")
    a = with_mount(verbs.add_parser("add", help="add an X.509 certificate to a keyring, as keyctl padd "
                                    "asymmetric would; KEY_CHECK rules measure it"))
    a.add_argument("--keyring", default=".ima",
                   help="the keyring: .ima (default; the kernel names it _ima without "
                        "integrity_trusted_keyring); .builtin_trusted_keys, .machine and .platform "
                        "take keys at boot only, from the profile; a name without a leading dot "
                        "is a keyring of your own, made by its first key")
    a.add_argument("cert", help="the certificate file, DER or PEM")
    a.set_defaults(fn=cmd_keys_add)
    ls = with_mount(verbs.add_parser("list", help="the keys on every keyring: keyring, key id, subject"))
    ls.add_argument("--json", action="store_true", help="JSON, with each key's /proc/keys description")
    ls.set_defaults(fn=cmd_keys_list)
    b = with_mount(verbs.add_parser("blacklist", help="add a bin:<hex> (file digest) or tbs:<hex> "
                                    "(certificate) entry to .blacklist"))
    b.add_argument("entry", help="bin:<hex> or tbs:<hex>")
    b.set_defaults(fn=cmd_keys_blacklist)
