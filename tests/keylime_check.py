"""keylime's verifier check of an ASCII list against a PCR 10 value (clients.md)."""

from __future__ import annotations

import copy
import logging
import os

os.environ.setdefault("KEYLIME_VERIFIER_IGNORE_TOMTOU_ERRORS", "False")
logging.getLogger("keylime").setLevel(logging.CRITICAL)

from keylime.common.algorithms import Hash  # noqa: E402
from keylime.ima import ima  # noqa: E402


def runtime_policy(trusted_list: str, log_hash_alg: str) -> dict:
    """A runtime policy allowing every file and buffer digest of ``trusted_list``,
    as `keylime-policy create runtime -m` would make it."""
    policy = copy.deepcopy(ima.EMPTY_RUNTIME_POLICY)
    policy["ima"]["log_hash_alg"] = log_hash_alg
    for line in trusted_list.splitlines():
        fields = line.split(" ")
        template, digest, name = fields[2], fields[3], fields[4]
        if template == "ima":
            hexd = digest
        else:
            hexd = digest.split(":")[-1]
        table = policy["ima-buf"] if template == "ima-buf" else policy["digests"]
        table.setdefault(name, []).append(hexd)
    return policy


def keylime_verify(ascii_list: str, pcr10_hex: str, bank: str = "sha1", log_hash_alg: str = "sha1",
                   trusted_list: str | None = None) -> list[str]:
    """Failure descriptions of keylime's verifier (empty: accepted)."""
    policy = runtime_policy(ascii_list if trusted_list is None else trusted_list, log_hash_alg)
    _, failure = ima.process_measurement_list(None, ascii_list.splitlines(keepends=True), policy,
                                              pcrval=pcr10_hex, hash_alg=Hash(bank))
    return [f"{e.event_id}: {e.context}" for e in failure.events]
