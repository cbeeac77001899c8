"""Record trust without p2pd: identities, the signed-entry validator, the swarm key and which model claims to believe.

Everything here runs on bytes and in-memory objects; tests/test_hostile_dht.py and
tests/test_private_swarm.py run the same code against a rogue peer on real p2pd peers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2, dht_pb2
from hivemind.utils.crypto import RSAPrivateKey

from swarm import config as config_module
from swarm.cli import main as cli_main
from swarm.command_config import ApiConfig, FinetuneConfig, HealthConfig
from swarm.config import ClientConfig, ServerConfig
from swarm.errors import ConfigError
from swarm.identity import Identity, load_identity, new_identity, verify
from swarm.records import MODEL_INDEX_KEY, ModelRecord, block_key
from swarm.signed_records import MAX_ENVELOPE_BYTES, MAX_RECORD_TTL, TAG, SignedRecordValidator, signed_payload
from swarm.swarm_key import SwarmKey, SwarmKeyAuthorizer, check_stream_proof, stream_proof, write_key_file
from swarm.swarm_state import MAX_MODEL_BLOCKS, claims_to_check, likeliest_model, pick_model

NOW = 1_000_000.0
KEY = DHTID.generate(source=block_key("tiny-llama", 2)).to_bytes()
PLAIN_VALUE_MARKER = msgpack.packb(None)  # the subkey hivemind gives a plain (non-dictionary) value


def subkey(peer_id: str) -> bytes:
    return msgpack.packb(peer_id, use_bin_type=True)


def signed(validator: SignedRecordValidator, value: bytes = b"\xc4\x03abc", key: bytes = KEY,
           expiration: float = NOW + 100) -> DHTRecord:
    record = DHTRecord(key, subkey(validator.identity.peer_id), value, expiration)
    return dataclasses.replace(record, value=validator.sign_value(record))


def forged_envelope(signer: Identity, record: DHTRecord) -> bytes:
    """An envelope ``signer`` signs for whatever subkey ``record`` has (as a rogue peer would make it)."""
    signature = signer.sign(signed_payload(record.key, record.subkey, record.value, record.expiration_time))
    return msgpack.packb([TAG, record.value, signature, signer.carried_public_key], use_bin_type=True)


@pytest.fixture(scope="module")
def rsa_identity(tmp_path_factory) -> Identity:
    path = str(tmp_path_factory.mktemp("identity") / "rsa.id")
    P2P.generate_identity(path)  # the RSA key file hivemind writes for --identity-path
    return load_identity(path)


def validator_of(identity: Identity) -> SignedRecordValidator:
    return SignedRecordValidator(identity, clock=lambda: NOW)


# ---------------------------------------------------------------- identities


def test_ed25519_identity_round_trips_and_its_peer_id_is_the_key(tmp_path):
    identity = new_identity()
    assert identity.peer_id.startswith("12D3KooW") and identity.carried_public_key == b""
    path = tmp_path / "ed.id"
    path.write_bytes(identity.to_protobuf())
    assert load_identity(str(path)).peer_id == identity.peer_id


def test_rsa_identity_file_of_hivemind_gives_hivemind_s_peer_id(tmp_path, rsa_identity):
    path = str(tmp_path / "rsa.id")
    P2P.generate_identity(path)
    with open(path, "rb") as f:
        assert load_identity(path).peer_id == PeerID.from_identity(f.read()).to_base58()
    assert rsa_identity.peer_id.startswith("Qm") and rsa_identity.carried_public_key


SECP256K1_KEY = crypto_pb2.PrivateKey(key_type=crypto_pb2.Secp256k1, data=b"x" * 32).SerializeToString()


@pytest.mark.parametrize("content", [b"", b"not a protobuf", SECP256K1_KEY])
def test_unusable_identity_files_are_refused_by_flag(tmp_path, content):
    path = tmp_path / "bad.id"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="--identity-path"):
        load_identity(str(path))


def test_small_rsa_keys_are_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    path = tmp_path / "small.id"
    path.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der).SerializeToString())
    with pytest.raises(ConfigError, match="2048-4096 bits"):
        load_identity(str(path))


def test_verify_binds_signatures_to_the_peer_id(rsa_identity):
    alice, mallory = new_identity(), new_identity()
    signature = alice.sign(b"data")
    assert verify(alice.peer_id, b"data", signature)
    assert not verify(alice.peer_id, b"other data", signature)
    assert not verify(alice.peer_id, b"data", mallory.sign(b"data"))
    assert not verify(alice.peer_id, b"data", signature, carried_public_key=mallory.carried_public_key or b"k")
    assert not verify("not-a-peer-id", b"data", signature)
    # RSA: the carried key must hash to the peer id
    rsa_signature = rsa_identity.sign(b"data")
    assert verify(rsa_identity.peer_id, b"data", rsa_signature, rsa_identity.carried_public_key)
    assert not verify(rsa_identity.peer_id, b"data", rsa_signature)
    other = Identity(rsa.generate_private_key(public_exponent=65537, key_size=2048), rsa_identity.peer_id)
    assert not verify(rsa_identity.peer_id, b"data", other.sign(b"data"), other.carried_public_key)


# ---------------------------------------------------------------- the validator


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_own_entries_are_signed_validated_and_stripped(kind, rsa_identity):
    validator = validator_of(new_identity() if kind == "ed25519" else rsa_identity)
    record = signed(validator)
    assert record.value != b"\xc4\x03abc"
    reader = validator_of(new_identity())  # any other peer checks it the same way
    assert reader.validate(record) and validator.validate(record)
    assert reader.strip_value(record) == b"\xc4\x03abc"


def test_an_entry_under_another_peer_s_id_is_refused(rsa_identity):
    victim, mallory = new_identity(), new_identity()
    validator = validator_of(victim)
    record = DHTRecord(KEY, subkey(victim.peer_id), b"\xc4\x03abc", NOW + 100)
    for signer in (mallory, rsa_identity):  # Ed25519 key of another peer; RSA key that does not hash to the id
        assert not validator.validate(dataclasses.replace(record, value=forged_envelope(signer, record)))
    # this peer refuses to sign for a subkey that is not its own: the store fails locally
    mallory_validator = validator_of(mallory)
    assert mallory_validator.sign_value(record) == record.value
    assert not mallory_validator.validate(record)


def test_the_old_owner_key_subkey_is_refused():
    """``<victim id>[owner:<attacker key>]`` signed by the attacker: what hivemind's RSA validator believes."""
    victim, attacker = new_identity(), RSASignatureValidator(RSAPrivateKey())
    record = DHTRecord(KEY, msgpack.packb(victim.peer_id.encode() + attacker.local_public_key), b"\xc4\x03abc",
                       NOW + 100)
    record = dataclasses.replace(record, value=attacker.sign_value(record))
    assert attacker.validate(record)
    assert not validator_of(victim).validate(record)


def test_plain_values_are_refused_under_every_key():
    validator = validator_of(new_identity())
    record = signed(validator)
    assert not validator.validate(dataclasses.replace(record, subkey=PLAIN_VALUE_MARKER))
    assert not validator.validate(DHTRecord(KEY, PLAIN_VALUE_MARKER, b"\xc4\x01x", NOW + 10 ** 9))


def test_expirations_are_capped():
    validator = validator_of(new_identity())
    assert validator.validate(signed(validator, expiration=NOW + MAX_RECORD_TTL))
    for expiration in (NOW + MAX_RECORD_TTL + 1, NOW + 10 ** 9, float("inf"), float("nan")):
        assert not validator.validate(signed(validator, expiration=expiration)), expiration


def test_a_signed_entry_cannot_move_or_change():
    validator = validator_of(new_identity())
    record = signed(validator)
    other_key = DHTID.generate(source=block_key("tiny-llama", 3)).to_bytes()
    index_key = DHTID.generate(source=MODEL_INDEX_KEY).to_bytes()
    assert validator.validate(record)
    assert not validator.validate(dataclasses.replace(record, key=other_key))
    assert not validator.validate(dataclasses.replace(record, key=index_key))
    assert not validator.validate(dataclasses.replace(record, expiration_time=NOW + 200))
    assert not validator.validate(dataclasses.replace(record, subkey=subkey(new_identity().peer_id)))
    value, signature, key = msgpack.unpackb(record.value, raw=True)[1:]
    tampered = msgpack.packb([TAG, value + b"!", signature, key], use_bin_type=True)
    assert not validator.validate(dataclasses.replace(record, value=tampered))


@pytest.mark.parametrize("value", [
    b"", b"\xc1", msgpack.packb([TAG, b"v", b"s"]), msgpack.packb([b"other/1", b"v", b"s", b""]),
    msgpack.packb([TAG, "v", b"s", b""]), msgpack.packb({"a": 1}), b"\x00" * (MAX_ENVELOPE_BYTES + 1)])
def test_malformed_envelopes_are_refused(value):
    validator = validator_of(new_identity())
    assert not validator.validate(DHTRecord(KEY, subkey(validator.identity.peer_id), value, NOW + 10))


@pytest.mark.parametrize("bad_subkey", [msgpack.packb(5), msgpack.packb("peer id?"), b"\xc1", msgpack.packb("1" * 200),
                                        msgpack.packb(b"bytes")])
def test_subkeys_that_name_no_peer_are_refused(bad_subkey):
    validator = validator_of(new_identity())
    record = signed(validator)
    assert not validator.validate(dataclasses.replace(record, subkey=bad_subkey))


def test_verified_entries_are_cached(monkeypatch):
    import swarm.signed_records as module

    validator = validator_of(new_identity())
    record = signed(validator)
    calls = []
    real_verify = module.verify
    monkeypatch.setattr(module, "verify", lambda *args: calls.append(1) or real_verify(*args))
    assert validator.validate(record) and validator.validate(record)
    assert len(calls) == 1
    # the expiration cap is checked again on a hit: the clock moves, the cache does not extend an entry
    validator.clock = lambda: NOW - MAX_RECORD_TTL
    assert not validator.validate(record)


# ---------------------------------------------------------------- the swarm key


def test_key_files_in_both_formats(tmp_path):
    path = str(tmp_path / "swarm.key")
    key = write_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert SwarmKey.from_file(path) == key
    with open(path) as f:
        assert f.read().splitlines()[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"]
    bare = tmp_path / "bare.key"
    bare.write_text(key.secret.hex() + "\n")  # `openssl rand -hex 32 > bare.key`
    assert SwarmKey.from_file(str(bare)) == key
    with pytest.raises(ConfigError, match="never overwritten"):
        write_key_file(path)


@pytest.mark.parametrize("content", ["", "abcd", "zz" * 32, "00" * 33, "/key/swarm/psk/1.0.0/\n/base64/\nAAAA",
                                     "00" * 32 + "\n" + "00" * 32])
def test_bad_key_files_name_the_flag(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(ConfigError, match="--swarm-key .* is not a swarm key file.*swarm keygen"):
        SwarmKey.from_file(str(path))
    with pytest.raises(ConfigError, match="cannot be read"):
        SwarmKey.from_file(str(tmp_path / "missing.key"))


def test_stream_proofs_bind_key_peers_and_handler():
    key, other = SwarmKey(b"k" * 32), SwarmKey(b"o" * 32)
    proof = stream_proof(key, "opener", "server", "swarm.v1.info")
    assert check_stream_proof(key, proof, "opener", "server", "swarm.v1.info")
    for args in (("mallory", "server", "swarm.v1.info"), ("opener", "other", "swarm.v1.info"),
                 ("opener", "server", "swarm.v1.forward")):
        assert not check_stream_proof(key, proof, *args)
    assert not check_stream_proof(other, proof, "opener", "server", "swarm.v1.info")
    assert not check_stream_proof(key, "not bytes", "opener", "server", "swarm.v1.info")  # type: ignore[arg-type]


def test_dht_requests_and_responses_carry_the_key():
    async def scenario():
        member, also_member, outsider = (SwarmKeyAuthorizer(SwarmKey(s * 32)) for s in (b"k", b"k", b"o"))
        request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=b"node"))
        await member.sign_request(request, None)
        wire = request.SerializeToString()
        assert await also_member.validate_request(dht_pb2.PingRequest.FromString(wire))
        assert not await also_member.validate_request(dht_pb2.PingRequest.FromString(wire))  # a replay
        assert not await outsider.validate_request(dht_pb2.PingRequest.FromString(wire))
        tampered = dht_pb2.PingRequest.FromString(wire)
        tampered.peer.node_id = b"other"
        assert not await also_member.validate_request(tampered)
        stale = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=b"node"))
        await member.sign_request(stale, None)
        stale.auth.time -= 1000
        stale.auth.signature = b""
        stale.auth.signature = member._mac(stale)  # signed with the key, but too old
        assert not await also_member.validate_request(stale)
        unsigned = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=b"node"))
        assert not await also_member.validate_request(unsigned)

        response = dht_pb2.PingResponse(dht_time=1.0)
        await also_member.sign_response(response, request)
        wire = response.SerializeToString()
        assert await member.validate_response(dht_pb2.PingResponse.FromString(wire), request)
        assert not await outsider.validate_response(dht_pb2.PingResponse.FromString(wire), request)
        other_request = dht_pb2.PingRequest()
        await member.sign_request(other_request, None)
        assert not await member.validate_response(dht_pb2.PingResponse.FromString(wire), other_request)

    asyncio.run(scenario())


def test_every_role_takes_a_swarm_key(tmp_path):
    from swarm.cli import make_parser

    key = str(tmp_path / "swarm.key")
    assert cli_main(["keygen", key]) == 0
    peers = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWPVTDFfkfzTmKNMHsxSLGzuTUGUhHWzPHhD4AtxLh6Tuf"]
    for argv in (["dht"], ["serve", "--model", "m"], ["health", *peers], ["api", *peers],
                 ["finetune", *peers, "--model", "m", "--data", "d", "--output", "o"]):
        assert make_parser().parse_args([*argv, "--swarm-key", key]).swarm_key == key
    assert ServerConfig(model="m", swarm_key=key).swarm_key == key
    assert ClientConfig(initial_peers=tuple(peers[1:]), swarm_key=key).swarm_key == key
    assert HealthConfig(initial_peers=tuple(peers[1:]), swarm_key=key).swarm_key == key
    assert ApiConfig(initial_peers=tuple(peers[1:]), swarm_key=key).swarm_key == key
    assert FinetuneConfig(initial_peers=tuple(peers[1:]), model="m", data="d", output="o",
                          swarm_key=key).swarm_key == key
    bad = tmp_path / "bad.key"
    bad.write_text("nope")
    for make in (lambda: ServerConfig(model="m", swarm_key=str(bad)),
                 lambda: ClientConfig(initial_peers=tuple(peers[1:]), swarm_key=str(bad)),
                 lambda: HealthConfig(initial_peers=tuple(peers[1:]), swarm_key=str(bad)),
                 lambda: ApiConfig(initial_peers=tuple(peers[1:]), swarm_key=str(bad))):
        with pytest.raises(ConfigError, match="--swarm-key"):
            make()


def test_servers_announce_within_the_cap():
    assert 2.5 * config_module.MAX_UPDATE_PERIOD + 120 <= MAX_RECORD_TTL  # 2 minutes left for clock skew
    with pytest.raises(ConfigError, match="--update-period 301"):
        ServerConfig(model="m", update_period=301)


# ---------------------------------------------------------------- which model claims to believe


def claim(num_blocks: int = 4, name: str = "org/tiny", prefix: str = "tiny") -> ModelRecord:
    return ModelRecord(prefix=prefix, name=name, num_blocks=num_blocks, family="llama")


def test_the_confirmed_claim_wins_over_a_poisoned_one():
    claims = {"a": claim(), "b": claim(), "rogue": claim(4096), "rogue2": claim(64)}
    served = {"a": ("org/tiny", 4), "b": ("org/tiny", 4)}
    assert pick_model(claims, served) == claim()
    # a rogue that answers info for its own claim still loses to more servers
    assert pick_model(claims, {**served, "rogue2": ("org/tiny", 64)}) == claim()
    # a claim nobody confirms is not believed, however many peers make it
    assert pick_model({f"ghost{i}": claim(64, prefix="ghost") for i in range(50)}, {}) is None
    # info naming another model or block count confirms nothing
    assert pick_model({"a": claim()}, {"a": ("org/other", 4)}) is None
    assert pick_model({"a": claim()}, {"a": ("org/tiny", 5)}) is None


def test_claims_over_the_block_limit_are_ignored():
    huge = claim(MAX_MODEL_BLOCKS + 1)
    assert pick_model({"a": huge}, {"a": ("org/tiny", MAX_MODEL_BLOCKS + 1)}) is None
    assert claims_to_check({"a": huge}) == []


def test_the_likeliest_claim_is_the_most_made_one():
    assert likeliest_model({"a": claim(), "b": claim(), "rogue": claim(64)}) == claim()
    assert likeliest_model({"a": claim(8), "b": claim(4)}) == claim(4)  # a tie: fewer blocks
    assert likeliest_model({"a": claim(MAX_MODEL_BLOCKS + 1)}) is None
    assert likeliest_model({}) is None


def test_claims_to_check_is_bounded_and_keeps_the_most_made_claim():
    claims = {f"rogue{i}": claim(10 + i) for i in range(200)}
    claims.update({"a": claim(), "b": claim()})
    checked = claims_to_check(claims, per_claim=3, max_claims=4)
    assert len(checked) <= 3 + 3 * 3 and {"a", "b"} <= set(checked)


def test_claimants_that_left_do_not_hide_a_live_server_s_claim():
    """Entries outlive their servers: the first claimants probed are gone, the next round reaches the live one;
    a confirmed claim is not probed further, and rounds stop at max_per_claim probes per claim."""
    claims = {"dead1": claim(), "dead2": claim(), "dead3": claim(), "live": claim()}
    answers: dict = {}
    rounds = []
    while batch := claims_to_check(claims, answers, per_claim=3, max_claims=4):
        rounds.append(batch)
        answers.update({p: ("org/tiny", 4) if p == "live" else None for p in batch})
    assert rounds == [["dead1", "dead2", "dead3"], ["live"]]
    assert pick_model(claims, {p: a for p, a in answers.items() if a}) == claim()

    ghosts = {f"ghost{i:03}": claim(64, prefix="ghost") for i in range(100)}  # none answers
    answers = {}
    probes = 0
    while batch := claims_to_check(ghosts, answers, per_claim=3, max_claims=4, max_per_claim=12):
        probes += len(batch)
        answers.update(dict.fromkeys(batch))
    assert probes == 12


def test_a_crawl_spends_bounded_time_per_model(monkeypatch):
    """One model whose block keys never come back (say 1000 claimed blocks on a slow DHT) keeps its previous
    state and is named in the error; the other models of the same crawl update."""
    import health.crawler as crawler_module
    from health.crawler import Crawler
    from health.probe import ProbeResult
    from swarm.records import ServerRecord, ServerState
    from swarm.wire import InfoResponse

    index = {"tiny": {"a": claim()}, "slow": {"b": claim(900, name="org/slow", prefix="slow")},
             "ghost": {"rogue": claim(64, name="org/ghost", prefix="ghost")}}
    record = ServerRecord(state=ServerState.ONLINE, start=0, end=4)

    async def fetch_models(peer):
        return index

    async def fetch_servers(peer, prefix, blocks):
        if prefix == "slow":
            await asyncio.sleep(3600)
        return {b: {"a": record} for b in blocks}

    async def probe(self, peer_id, max_age=None):
        if peer_id == "rogue":
            return ProbeResult(ok=False, checked_at=0.0, error="no answer")
        name, num_blocks = ("org/slow", 900) if peer_id == "b" else ("org/tiny", 4)
        info = InfoResponse(protocol_version=1, version="0", model=name, start=0, end=4, hidden_size=8,
                            dtype="float32", max_session_length=8, max_batch_size=1, cache_tokens_left=1,
                            num_blocks=num_blocks)
        return ProbeResult(ok=True, checked_at=0.0, rtt=0.001, info=info)

    monkeypatch.setattr(crawler_module, "fetch_models", fetch_models)
    monkeypatch.setattr(crawler_module, "fetch_servers", fetch_servers)
    monkeypatch.setattr(crawler_module, "MODEL_TIMEOUT", 0.3)
    monkeypatch.setattr(Crawler, "probe", probe)
    crawler = Crawler(HealthConfig(initial_peers=("/ip4/127.0.0.1/tcp/1/p2p/12D3KooWPVTDFfkfzTmKNMHsxSLGzuTUGUhHWzPHhD4"
                                                  "AtxLh6Tuf",)))
    crawler._peer = object()  # type: ignore[assignment]  # the fakes above never touch it
    snapshot = asyncio.run(crawler.crawl_once())
    assert snapshot.crawl_duration < 2.0
    assert [m.prefix for m in snapshot.models] == ["tiny"]  # ghost: nobody confirms it; slow: timed out
    assert snapshot.error == "model slow: took over 0.3s" and snapshot.crawl_errors == 1
    assert snapshot.models[0].record.num_blocks == 4 and snapshot.models[0].probes["a"].ok
