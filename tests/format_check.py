#!/usr/bin/python3
"""An independent check of docs/FORMAT.md.

It knows only the spec: it re-implements the associated-data encodings with the
`cryptography` package, opens every vector in docs/FORMAT.md, and, given
`--live FILE` (JSON written by the out-of-process tests), unwraps a tenant key
read from a running server with the master key and opens an envelope that the
extension sealed. Exit status 0 means both implementations agree.
"""
import argparse
import base64
import json
import pathlib
import struct
import sys

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ROOT = pathlib.Path(__file__).resolve().parent.parent


def lp(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack(">I", len(b)) + b


def value_aad(tenant, key_id, context):
    ctx = b"\x00" if context is None else b"\x01" + lp(context)
    return b"pgseal:v2:value\x00" + lp(tenant) + lp(key_id) + ctx


def wrap_aad(purpose, tenant, key_id, version):
    return b"pgseal:v1:wrap\x00" + lp(purpose) + lp(tenant) + lp(key_id) + struct.pack(">I", version)


def b64url_decode(s):
    if "=" in s:
        raise ValueError("padding is not allowed")
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def parse_envelope(sealed):
    version, key_id, payload = sealed.split(":")
    assert version == "v2", "unknown envelope version"
    raw = b64url_decode(payload)
    return key_id, raw[:12], raw[12:]


def open_value(dek, tenant, context, sealed):
    key_id, nonce, ct = parse_envelope(sealed)
    return AESGCM(dek).decrypt(nonce, ct, value_aad(tenant, key_id, context)).decode("utf-8")


def unwrap(kek, purpose, tenant, key_id, version, wrapped):
    return AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], wrap_aad(purpose, tenant, key_id, version))


def jcs(value):
    """RFC 8785 for the value shapes the vectors use (no floats with exponents;
    an integral float is written as an integer, as ECMAScript does)."""
    def norm(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v
    return json.dumps(norm(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(prev, tenant, seq, at_us, actor, event, canonical_payload):
    return hashlib.sha256(
        b"pgseal:v1:ledger\x00" + prev + lp(tenant) + struct.pack(">q", seq) + struct.pack(">q", at_us)
        + lp(actor) + lp(event) + lp(canonical_payload)
    ).digest()


def payload_commitment(salt, canonical_payload):
    return hashlib.sha256(b"pgseal:v2:payload\x00" + salt + canonical_payload.encode("utf-8")).digest()


def entry_hash_v2(prev, tenant, seq, at_us, actor, db_role, event, subjects, commitment):
    assert len(prev) == 32 and len(commitment) == 32
    return hashlib.sha256(
        b"pgseal:v2:ledger\x00" + prev + lp(tenant) + struct.pack(">q", seq) + struct.pack(">q", at_us)
        + lp(actor) + lp(db_role) + lp(event) + struct.pack(">I", len(subjects))
        + b"".join(lp(s) for s in subjects) + commitment
    ).digest()


def check_v2_entry(v, prev):
    """One format 2 vector: its commitment (from salt and payload, or as stored when
    erased), hash and MAC. Returns the hash."""
    assert bytes.fromhex(v["prev_hash"]) == prev, "chain link differs"
    if v["erased"]:
        assert v["payload"] is None and v["salt"] is None, "an erased entry has no payload or salt"
        commitment = bytes.fromhex(v["commitment"])
    else:
        canonical = jcs(json.loads(v["payload"]))
        assert canonical == v["canonical_payload"], "canonical JSON differs"
        salt = bytes.fromhex(v["salt"])
        assert len(salt) == 32, "salt is not 32 bytes"
        commitment = payload_commitment(salt, canonical)
        assert commitment.hex() == v["commitment"], "payload commitment differs"
    h = entry_hash_v2(prev, v["tenant"], v["seq"], v["recorded_at_us"], v["actor"], v["db_role"], v["event"],
                      v["subjects"], commitment)
    assert h.hex() == v["hash"], "format 2 entry hash differs"
    assert hmac.new(bytes.fromhex(v["mac_key"]), h, hashlib.sha256).hexdigest() == v["mac"], "MAC differs"
    return h


def checkpoint_key(v):
    """v2: the random checkpoint key, given as its seed; v1: derived from a master key."""
    if "checkpoint_key" in v:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["checkpoint_key"]))
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pgseal:v1:checkpoint-key").derive(
        bytes.fromhex(v["master_key"]))
    return Ed25519PrivateKey.from_private_bytes(seed)


def checkpoint_message(cp):
    """v2 when the checkpoint names its ledger and previous one (ledger_id, prev_seq,
    prev_hash), v1 when it names none of them."""
    head = lp(cp["tenant"]) + struct.pack(">q", cp["seq"]) + bytes.fromhex(cp["hash"])
    tail = lp(cp["signed_at"]) + struct.pack(">I", cp["key_version"])
    v2_fields = [f in cp for f in ("ledger_id", "prev_seq", "prev_hash")]
    if any(v2_fields):
        assert all(v2_fields), "a v2 checkpoint names ledger_id, prev_seq and prev_hash"
        prev_hash = bytes.fromhex(cp["prev_hash"])
        assert len(prev_hash) == 32, "prev_hash is not 32 bytes"
        return (b"pgseal:v2:checkpoint\x00" + lp(cp["ledger_id"]) + head + struct.pack(">q", cp["prev_seq"])
                + prev_hash + tail)
    return b"pgseal:v1:checkpoint\x00" + head + tail


def lp64(b: bytes) -> bytes:
    return struct.pack(">Q", len(b)) + b


def grant_text(v):
    """An offboarding grant: HKDF-SHA256 of the master key, then HMAC-SHA256 over
    length-prefixed fields (8-byte lengths)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pgseal offboard grant v1").derive(
        bytes.fromhex(v["master_key"]))
    check = hmac.new(key, b"pgseal.offboard_grant.v1.key_check", hashlib.sha256).digest()[:8]
    fields = [b"pgseal.offboard_grant.v1", struct.pack(">I", v["version"]), struct.pack(">q", v["expires"])]
    fields += [v[f].encode() for f in ("database", "table", "role", "tenant")]
    mac = hmac.new(key, b"".join(lp64(f) for f in fields), hashlib.sha256).hexdigest()
    return "v1.%d.%d.%s.%s" % (v["version"], v["expires"], check.hex(), mac)


def vectors(kind):
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    fence = "```jsonl vectors:" + kind + "\n"
    start = doc.index(fence) + len(fence)
    end = doc.index("```", start)
    return [json.loads(l) for l in doc[start:end].splitlines() if l.strip()]


def check_vectors():
    n = 0
    for v in vectors("value"):
        dek = bytes.fromhex(v["dek"])
        assert open_value(dek, v["tenant"], v["context"], v["sealed"]) == v["plaintext"]
        nonce = bytes.fromhex(v["nonce"])
        ct = AESGCM(dek).encrypt(nonce, v["plaintext"].encode(), value_aad(v["tenant"], v["key_id"], v["context"]))
        again = "v2:%s:%s" % (v["key_id"], base64.urlsafe_b64encode(nonce + ct).decode().rstrip("="))
        assert again == v["sealed"], "sealing the vector gives other bytes"
        n += 1
    for v in vectors("wrap"):
        key = unwrap(bytes.fromhex(v["kek"]), v["purpose"], v["tenant"], v["key_id"], v["kek_version"],
                     bytes.fromhex(v["wrapped"]))
        assert key.hex() == v["key"]
        n += 1
    prev = bytes(32)
    for v in vectors("ledger"):
        canonical = jcs(json.loads(v["payload"]))
        assert canonical == v["canonical_payload"], "canonical JSON differs"
        assert bytes.fromhex(v["prev_hash"]) == prev, "chain link differs"
        h = entry_hash(prev, v["tenant"], v["seq"], v["recorded_at_us"], v["actor"], v["event"], canonical)
        assert h.hex() == v["hash"], "entry hash differs"
        assert hmac.new(bytes.fromhex(v["mac_key"]), h, hashlib.sha256).hexdigest() == v["mac"], "MAC differs"
        prev = h
        n += 1
    # The format 2 vectors continue the format 1 chain.
    erased = 0
    for v in vectors("ledger_v2"):
        prev = check_v2_entry(v, prev)
        erased += v["erased"]
        n += 1
    assert erased == 1, "one erased format 2 vector"
    versions = set()
    for v in vectors("checkpoint"):
        sk = checkpoint_key(v)
        pk = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        assert pk.hex() == v["public_key"], "public key differs"
        cp = v["checkpoint"]
        assert sk.sign(checkpoint_message(cp)).hex() == cp["signature"], "signature differs"
        Ed25519PublicKey.from_public_bytes(pk).verify(bytes.fromhex(cp["signature"]), checkpoint_message(cp))
        versions.add(2 if "prev_seq" in cp else 1)
        n += 1
    assert versions == {1, 2}, "checkpoint vectors of both versions"
    grants = vectors("grant")
    assert len(grants) >= 2, "too few grant vectors"
    for v in grants:
        assert grant_text(v) == v["grant"], "grant differs"
        n += 1
    return n


def check_live(path):
    live = json.loads(pathlib.Path(path).read_text())
    kek = bytes.fromhex(live["master_key_hex"])
    dek = unwrap(kek, "dek", live["tenant"], live["key_id"], live["kek_version"], bytes.fromhex(live["wrapped_hex"]))
    got = open_value(dek, live["tenant"], live["context"], live["sealed"])
    assert got == live["plaintext"], "live envelope opened to other text"
    return 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--live", help="JSON file describing one envelope sealed by a running server")
    args = ap.parse_args()
    n = check_vectors()
    if args.live:
        n += check_live(args.live)
    print("format_check: %d passed, 0 failed" % n)


if __name__ == "__main__":
    sys.exit(main())
