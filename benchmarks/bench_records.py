"""What trusting DHT records and private swarms cost per entry and per message. Prints JSON.

    python benchmarks/bench_records.py [--entries 2000]

For an Ed25519 identity (what every peer gets unless ``--identity-path`` holds hivemind's RSA key)
and an RSA-2048 one: signing one block-key entry (``SignedRecordValidator.sign_value``), checking
one a peer has not seen (``validate`` on a fresh validator: the signature is verified), and checking
one again (the validator remembers verified entries). hivemind's ``RSASignatureValidator`` (what
Swarm used before: it accepted a key carried in the subkey) is measured in the same run; ratios
are against it. Then the swarm key: an HMAC over one DHT request (``SwarmKeyAuthorizer``, sign and
check) and one stream proof (``stream_proof`` + ``check_stream_proof``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import msgpack
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P
from hivemind.proto import dht_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swarm.identity import Identity, load_identity, new_identity  # noqa: E402
from swarm.records import ServerRecord, ServerState, block_key, encode_record  # noqa: E402
from swarm.signed_records import SignedRecordValidator  # noqa: E402
from swarm.swarm_key import SwarmKey, SwarmKeyAuthorizer, check_stream_proof, stream_proof  # noqa: E402

REPEATS = 5  # each figure is the median of this many timed passes


def per_item_us(fn, items: list) -> float:
    """Median over REPEATS passes of the microseconds ``fn`` takes per item."""
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - started) / len(items) * 1e6)
    return round(statistics.median(times), 2)


def records(owner: str, n: int) -> list[DHTRecord]:
    """``n`` block-key entries of one server, as the DHT hands them to a validator (value serialized)."""
    value = msgpack.packb(encode_record(ServerRecord(state=ServerState.ONLINE, start=0, end=8, throughput=100.0)),
                          use_bin_type=True)
    expiration = get_dht_time() + 300
    return [DHTRecord(DHTID.generate(source=block_key("bench", i)).to_bytes(), msgpack.packb(owner), value,
                      expiration) for i in range(n)]


def measure_swarm(identity: Identity, n: int) -> dict[str, float]:
    signer = SignedRecordValidator(identity)
    plain = records(identity.peer_id, n)
    signed = [dataclasses.replace(r, value=signer.sign_value(r)) for r in plain]

    def check_fresh(record: DHTRecord) -> None:
        assert SignedRecordValidator(identity).validate(record)  # a new validator: nothing remembered

    checker = SignedRecordValidator(identity)
    assert all(checker.validate(r) for r in signed)
    return {"sign_us": per_item_us(signer.sign_value, plain), "check_us": per_item_us(check_fresh, signed),
            "check_again_us": per_item_us(lambda r: checker.validate(r), signed),
            "envelope_bytes": len(signed[0].value) - len(plain[0].value)}


def measure_hivemind(n: int) -> dict[str, float]:
    validator = RSASignatureValidator(RSAPrivateKey())
    subkey = msgpack.packb(b"peer" + validator.local_public_key)
    plain = [dataclasses.replace(r, subkey=subkey) for r in records("x", n)]
    signed = [dataclasses.replace(r, value=validator.sign_value(r)) for r in plain]
    assert all(validator.validate(r) for r in signed)
    return {"sign_us": per_item_us(validator.sign_value, plain), "check_us": per_item_us(validator.validate, signed)}


def measure_swarm_key(n: int) -> dict[str, float]:
    authorizer = SwarmKeyAuthorizer(SwarmKey(os.urandom(32)))
    key = SwarmKey(os.urandom(32))

    async def dht_request() -> None:
        request = dht_pb2.FindRequest(keys=[os.urandom(20)])
        await authorizer.sign_request(request)
        assert await authorizer.validate_request(request)

    def proof(_: int) -> None:
        assert check_stream_proof(key, stream_proof(key, "opener", "server", "/swarm/forward"), "opener", "server",
                                  "/swarm/forward")

    loop = asyncio.new_event_loop()
    try:
        dht_us = per_item_us(lambda _: loop.run_until_complete(dht_request()), list(range(n)))
    finally:
        loop.close()
    return {"dht_request_sign_and_check_us": dht_us, "stream_proof_make_and_check_us": per_item_us(proof, list(range(n)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000, help="entries (and messages) per timed pass")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        P2P.generate_identity(os.path.join(tmp, "rsa.id"))  # hivemind's RSA-2048 key file
        rsa_identity = load_identity(os.path.join(tmp, "rsa.id"))
    rsa_entries = max(1, args.entries // 10)  # RSA signing is slow: fewer entries, same medians
    result = {"entries": args.entries, "cpus": os.cpu_count(), "repeats": REPEATS,
              "hivemind_rsa_before": measure_hivemind(rsa_entries),
              "ed25519": measure_swarm(new_identity(), args.entries),
              "rsa2048": measure_swarm(rsa_identity, rsa_entries),
              "swarm_key": measure_swarm_key(args.entries)}
    before = result["hivemind_rsa_before"]
    for kind in ("ed25519", "rsa2048"):
        for what in ("sign_us", "check_us"):
            result[kind][what.replace("_us", "_vs_before")] = round(result[kind][what] / before[what], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
