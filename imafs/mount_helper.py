"""``mount.fuse.imafs``: the helper mount(8) runs for ``-t fuse.imafs``.

util-linux's mount looks for ``/sbin/mount.<type>`` and, for a type with a
subtype, ``/sbin/mount.fuse.imafs`` before ``/sbin/mount.fuse``; it runs it
as ``mount.fuse.imafs SOURCE TARGET [-sfnv] [-o OPTIONS] [-t TYPE]``.  So
both of these end here::

    mount -t fuse.imafs imafs /mnt -o kernel=6.12,ima_policy=tcb
    imafs  /mnt  fuse.imafs  kernel=6.12,ima_policy=tcb,noauto  0 0     (fstab)

Each option that names a profile key is a ``--set KEY=VALUE`` of ``imafs
mount`` (a value holding a comma is quoted, as libmount allows:
``tpm_banks="sha1,sha256"``); ``profile=FILE`` is ``--profile``;
``measure=SRC:DST`` (repeatable) is ``--measure``; the generic options that
mount(8) and fstab use (``defaults``, ``rw``, ``noauto``, ``nofail``,
``x-*``, …) are ignored.  SOURCE is not used (write ``imafs``).  Exit
statuses are mount(8)'s: 1 for a bad invocation or option, 32 for a mount
that failed.
"""

from __future__ import annotations

import sys

from .profile import KEYS

EX_USAGE = 1  # MNT_EX_USAGE
EX_FAIL = 32  # MNT_EX_FAIL
IGNORED = {"defaults", "rw", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
           "_netdev", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "relatime", "noatime",
           "strictatime", "atime", "async", "sync"}


class OptionError(ValueError):
    pass


def split_options(text: str) -> list[str]:
    """A mount option string split at the commas outside double quotes, the
    quotes taken away."""
    out, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise OptionError(f"unbalanced double quote in -o {text}")
    out.append("".join(cur))
    return [o for o in out if o]


def mount_args(options: list[str]) -> list[str]:
    """The ``imafs mount`` arguments of mount options."""
    args = []
    for opt in options:
        key, sep, value = opt.partition("=")
        if opt in IGNORED or key.startswith(("x-", "comment")):
            continue
        if key == "profile" and sep:
            args += ["--profile", value]
        elif key == "measure" and sep:
            args += ["--measure", value]
        elif (key in KEYS or key.startswith("boot_pcrs.")) and sep:
            args += ["--set", f"{key}={value}"]
        else:
            raise OptionError(f"unknown option {opt!r}; use KEY=VALUE with a profile key "
                              f"({', '.join(KEYS)}), profile=FILE or measure=SRC:DST")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    positional, options, fake = [], [], False
    it = iter(argv)
    try:
        for a in it:
            if a == "-o":
                options += split_options(next(it))
            elif a.startswith("-o"):
                options += split_options(a[2:])
            elif a == "-t":
                next(it)
            elif a.startswith("-") and len(a) > 1:
                fake = fake or "f" in a[1:]  # -s (sloppy), -n (no mtab), -v: nothing to do
            else:
                positional.append(a)
        if len(positional) != 2:
            raise OptionError("usage: mount.fuse.imafs SOURCE MOUNTPOINT [-o OPTIONS]")
        args = mount_args(options)
    except (OptionError, StopIteration) as e:
        print(f"mount.fuse.imafs: {e or 'an option lacks its value'}", file=sys.stderr)
        return EX_USAGE
    if fake:
        return 0
    from .cli import main as imafs
    return 0 if imafs(["mount", positional[1], *args]) == 0 else EX_FAIL


if __name__ == "__main__":
    sys.exit(main())
