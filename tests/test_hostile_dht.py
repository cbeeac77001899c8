"""A rogue DHT peer against a real swarm: forged records, erasing stores and a poisoned model index.

The rogue is built on hivemind directly (its own p2pd and ``DHTNode``), so it is not held to Swarm's
rules: it sends raw stores to every honest node, keeps forged values in its own storage for honest
lookups to find, and signs entries for as many made-up identities as it likes. The swarm is the
shared ``llama_swarm`` (a DHT peer and servers 0:1, 1:3, 3:4 of the tiny Llama, prefix ``tiny-llama``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import msgpack
import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from swarm.command_config import HealthConfig
from swarm.dht import Peer, declare_server, fetch_models, fetch_servers
from swarm.identity import Identity, identity_file, new_identity
from swarm.records import MODEL_INDEX_KEY, ModelRecord, ServerRecord, ServerState, block_key, encode_record
from swarm.signed_records import TAG, signed_payload
from swarm.swarm_state import model_health

from peer_helpers import fresh_generate, joined

pytestmark = pytest.mark.integration
PREFIX = "tiny-llama"
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def pack(value: bytes) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # how a DHT node serializes a value before signing it


def envelope(signer: Identity, key: str, subkey: object, value: bytes, expiration: float) -> bytes:
    """What ``signer`` signs for (key, subkey): a valid entry only when the subkey is ``signer``'s own id."""
    key_id, subkey_bytes = DHTID.generate(source=key).to_bytes(), msgpack.packb(subkey, use_bin_type=True)
    signature = signer.sign(signed_payload(key_id, subkey_bytes, pack(value), expiration))
    return msgpack.packb([TAG, pack(value), signature, signer.carried_public_key], use_bin_type=True)


@dataclasses.dataclass
class Rogue:
    p2p: P2P
    node: DHTNode
    identity: Identity
    honest: list[PeerID]  # every honest node: the DHT peer and the servers

    async def store(self, key: str, subkey: object, value: bytes, expiration: float) -> list[bool | None]:
        """Asks every honest node to store one raw entry (``subkey`` None: a plain value); their answers."""
        key_id = DHTID.generate(source=key)
        results = await asyncio.gather(*(self.node.protocol.call_store(
            peer, [key_id], [value], expiration, subkeys=None if subkey is None else [subkey]) for peer in self.honest))
        return [r[0] if r else None for r in results]

    def keep(self, key: str, subkey: object, value: bytes, expiration: float) -> None:
        """Holds an entry in the rogue's own storage, where honest lookups that visit it will find it."""
        storage = self.node.protocol.storage
        if subkey is None:
            storage.store(DHTID.generate(source=key), value, expiration)
        else:
            storage.store_subkey(DHTID.generate(source=key), subkey, value, expiration)


@contextlib.asynccontextmanager
async def rogue_peer(initial_peers: list[str], honest: list[str]):
    identity = new_identity()
    with identity_file(identity) as path:
        p2p = await P2P.create(initial_peers=initial_peers, host_maddrs=list(LOOPBACK), identity_path=path,
                               check_if_identity_free=False)
    try:
        node = await DHTNode.create(p2p=p2p, initial_peers=initial_peers, wait_timeout=3, cache_locally=False)
        try:
            yield Rogue(p2p, node, identity, [PeerID.from_base58(p) for p in honest])
        finally:
            await node.shutdown()
    finally:
        await p2p.shutdown()


async def servers_by_span(peer: Peer) -> dict[tuple[int, int], str]:
    found = await fetch_servers(peer, PREFIX, range(4))
    return {(r.start, r.end): p for records in found.values() for p, r in records.items()
            if r.state == ServerState.ONLINE}


def honest_ids(swarm, spans: dict[tuple[int, int], str]) -> list[str]:
    return [swarm.initial_peers[0].rsplit("/p2p/", 1)[1], *spans.values()]


def run(coro, timeout: float = 180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def generate(model_path: str, swarm, ids: torch.Tensor) -> torch.Tensor:
    """A new client (no cached routing: it reads the records afresh) generates 6 tokens greedily."""
    return fresh_generate(model_path, swarm.initial_peers, ids, 6)


IDS = torch.randint(3, 1000, (1, 5), generator=torch.Generator().manual_seed(5))


def test_records_forged_under_a_victim_s_id_are_refused(tiny_llama, llama_swarm, local_llama):
    async def attack() -> None:
        async with joined(llama_swarm.initial_peers) as reader:
            spans = await servers_by_span(reader)
            assert set(spans) == {(0, 1), (1, 3), (3, 4)}
            async with rogue_peer(llama_swarm.initial_peers, honest_ids(llama_swarm, spans)) as rogue:
                expiration = get_dht_time() + 600  # later than the real records: they would be replaced
                old_style = RSASignatureValidator(RSAPrivateKey())
                answers = []
                for (start, end), victim in spans.items():
                    offline = encode_record(ServerRecord(state=ServerState.OFFLINE, start=start, end=end))
                    bogus_span = encode_record(ServerRecord(state=ServerState.ONLINE, start=0, end=4))
                    for block in range(start, end):
                        key = block_key(PREFIX, block)
                        # 1. the victim's id as subkey, signed with the rogue's own key (Ed25519)
                        for value in (offline, bogus_span):
                            forged = envelope(rogue.identity, key, victim, value, expiration)
                            answers += await rogue.store(key, victim, forged, expiration)
                            rogue.keep(key, victim, forged, expiration)
                        # 2. the attack that worked before: "<victim id>[owner:<rogue key>]", signed by the rogue
                        old_subkey = victim.encode() + old_style.local_public_key
                        record = DHTRecord(DHTID.generate(source=key).to_bytes(), msgpack.packb(old_subkey),
                                           pack(offline), expiration)
                        answers += await rogue.store(key, old_subkey, old_style.sign_value(record), expiration)
                assert answers and all(a is False for a in answers), answers  # every honest node said no

                # an honest lookup that asks the rogue itself gets nothing from it
                found = await reader.node.protocol.call_find(rogue.p2p.peer_id, [DHTID.generate(
                    source=block_key(PREFIX, 1))])
                assert found is not None and next(iter(found.values()))[0] is None
                assert await servers_by_span(reader) == spans  # every victim still ONLINE on its own span
                # new clients while the rogue still holds its forgeries: the fault-free output, 5/5
                for _ in range(5):
                    outputs.append(await asyncio.to_thread(generate, tiny_llama, llama_swarm, IDS))

    outputs: list[torch.Tensor] = []
    run(attack(), timeout=300)
    expected = local_llama.generate(IDS, max_new_tokens=6, do_sample=False)
    assert len(outputs) == 5 and all(torch.equal(out, expected) for out in outputs)


def test_a_plain_store_with_a_late_expiration_neither_erases_nor_blocks(tiny_llama, llama_swarm, local_llama):
    async def attack() -> None:
        async with joined(llama_swarm.initial_peers) as reader:
            spans = await servers_by_span(reader)
            honest = honest_ids(llama_swarm, spans)
            # a server of a scratch prefix has announced; the rogue then tries to shadow its key
            record = ServerRecord(state=ServerState.JOINING, start=0, end=1)
            assert await declare_server(reader, "scratch", record, expiration=30)
            async with rogue_peer(llama_swarm.initial_peers, honest) as rogue:
                late = get_dht_time() + 10 ** 7
                answers = []
                for key in [block_key(PREFIX, b) for b in range(4)] + [MODEL_INDEX_KEY, block_key("scratch", 0)]:
                    answers += await rogue.store(key, None, pack(b"erased"), late)  # a plain value
                    rogue.keep(key, None, pack(b"erased"), late)
                    # its own, properly signed entry, pinned far in the future
                    own = envelope(rogue.identity, key, rogue.identity.peer_id, b"pinned", late)
                    answers += await rogue.store(key, rogue.identity.peer_id, own, late)
                assert answers and all(a is False for a in answers), answers

                assert await servers_by_span(reader) == spans  # no block erased
                assert set(spans.values()) <= set((await fetch_models(reader))[PREFIX])  # nor the model index
                # the re-announcement of the scratch server is stored and seen (its result is not asserted:
                # hivemind reports the answer of the last replica, and the rogue's own node may refuse it)
                online = dataclasses.replace(record, state=ServerState.ONLINE)
                announced = get_dht_time()
                await declare_server(reader, "scratch", online, expiration=30)
                seen = (await fetch_servers(reader, "scratch", [0]))[0]
                assert {p: dataclasses.replace(r, announced_at=0.0) for p, r in seen.items()} == {
                    reader.peer_id.to_base58(): online}
                assert seen[reader.peer_id.to_base58()].announced_at >= announced  # this announcement, not the first
                # a new client while the rogue still holds its plain values: the fault-free output
                outputs.append(await asyncio.to_thread(generate, tiny_llama, llama_swarm, IDS))

    outputs: list[torch.Tensor] = []
    run(attack(), timeout=240)
    (output,) = outputs
    assert torch.equal(output, local_llama.generate(IDS, max_new_tokens=6, do_sample=False))


def test_the_model_index_cannot_be_wiped_or_poisoned(llama_swarm):
    """Made-up identities sign claims of their own (valid entries): the real model with 4096 blocks, a ghost
    model of 64 blocks with ONLINE records for every block, a huge model. The health crawl shows the real
    model, healthy, with its real block count, and nothing else; it takes seconds."""
    from health.crawler import Crawler

    config = HealthConfig(initial_peers=tuple(llama_swarm.initial_peers), host_maddrs=LOOPBACK, probe_timeout=3.0)

    async def crawl():
        async with Crawler(config) as crawler:
            started = time.monotonic()
            return await crawler.crawl_once(), time.monotonic() - started

    async def attack() -> None:
        async with joined(llama_swarm.initial_peers) as reader:
            spans = await servers_by_span(reader)
            fault_free, _ = await crawl()
            async with rogue_peer(llama_swarm.initial_peers, honest_ids(llama_swarm, spans)) as rogue:
                expiration = get_dht_time() + 60
                sybils = [new_identity() for _ in range(3)]
                claims = [(sybils[0], ModelRecord(prefix=PREFIX, name="poison", num_blocks=4096, family="llama")),
                          (sybils[1], ModelRecord(prefix="ghost", name="ghost", num_blocks=64, family="llama")),
                          (sybils[2], ModelRecord(prefix="huge", name="huge", num_blocks=4096, family="llama"))]
                answers = []
                for sybil, claim in claims:
                    value = encode_record(claim)
                    answers += await rogue.store(MODEL_INDEX_KEY, sybil.peer_id,
                                                 envelope(sybil, MODEL_INDEX_KEY, sybil.peer_id, value, expiration),
                                                 expiration)
                ghost = encode_record(ServerRecord(state=ServerState.ONLINE, start=0, end=64))
                for block in range(64):
                    key = block_key("ghost", block)
                    answers += await rogue.store(key, sybils[1].peer_id,
                                                 envelope(sybils[1], key, sybils[1].peer_id, ghost, expiration),
                                                 expiration)
                assert all(answers), answers  # an identity may say what it likes about itself...
                # ...but not about others: a claim under a real server's id is refused
                victim = spans[(1, 3)]
                forged = envelope(rogue.identity, MODEL_INDEX_KEY, victim, encode_record(claims[0][1]), expiration)
                assert not any(await rogue.store(MODEL_INDEX_KEY, victim, forged, expiration))
                index = await fetch_models(reader)
                assert index[PREFIX][victim].num_blocks == 4 and index[PREFIX][sybils[0].peer_id].num_blocks == 4096

                snapshot, took = await crawl()
        # the page shows what a crawl of the fault-free swarm showed: the same model, record and servers
        def seen(snap) -> list:
            return [(m.prefix, m.record, {b: {p: (r.state, r.start, r.end) for p, r in records.items()}
                                          for b, records in m.servers.items()}) for m in snap.models]

        assert seen(snapshot) == seen(fault_free)
        assert snapshot.error is None, snapshot.error
        shown = {m.prefix: m for m in snapshot.models}  # the shared swarm may serve other tests' models too
        assert PREFIX in shown and not {"ghost", "huge"} & set(shown), "the ghost and huge models must not show"
        model = shown[PREFIX]
        assert model.record.num_blocks == 4 and model.record.name != "poison"
        reachable = {p: r.ok for p, r in model.probes.items()}
        health = model_health(model.servers, model.record.num_blocks, reachable)
        assert health.healthy and list(health.replicas) == [1, 1, 1, 1]
        assert took < 15, f"a crawl took {took:.1f}s"

    run(attack())
