"""Every family's blocks, split into spans in this process, against local transformers (no peers).

The client's own model (``AutoDistributedModelForCausalLM``) runs here with the spans standing in
for the swarm: :class:`LocalSpans` for forward passes and :class:`LocalSession` for inference
sessions, each a plain loop over :class:`~swarm.blocks.Span` objects loaded by the server's loader.
This checks the family adapters, masks, alibi, rotary, checkpoint conversion and the client's
plumbing in milliseconds; ``test_families.py`` checks the same over real peers.

Tolerance: float32, logits within 1e-5; incremental steps within 1e-5 of the full forward; the server's
batched steps within 1e-5 of each session alone, relative to the largest hidden value (measured at
most 5.5e-6 absolute, on Gemma 3's larger states).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

import family_cases
import swarm.cli
from family_cases import CASES, EXTRA_CASES, FamilyCase
from client.tuning import Extras
from server.loading import load_span
from swarm.blocks import Span
from swarm.errors import ModelError
from swarm.models import FAMILIES, REMOTE_CODE_LAYOUT, family_of, kv_bytes_per_token, load_config
from swarm.translate import NORM_HEAD_ATTR
from swarm.weights import Checkpoint

ATOL = 1e-5
SPANS = ((0, 1), (1, 3), (3, 4))
UNREACHABLE_PEER = "/ip4/127.0.0.1/tcp/9/p2p/QmPeerThatIsNeverDialedBecauseSpansRunInProcess"
CPU = torch.device("cpu")


class LocalSpans:
    """Stands in for the client's RemoteSequence: runs the spans in this process."""

    tuning = None  # no LoRA or prompts: plain forward passes

    def __init__(self, spans: list[Span]) -> None:
        self.spans = spans

    def extras(self, training: bool = False) -> Extras:
        return Extras()

    async def forward(self, hidden: torch.Tensor, extras: Any = None) -> torch.Tensor:
        mask = None if extras is None or extras.attention_mask is None else extras.attention_mask.bool()
        positions = None if extras is None else extras.position_ids
        for span in self.spans:
            hidden = span(hidden, key_mask=mask, position_ids=positions)
        return hidden


class LocalSession:
    """Stands in for an InferenceSession: one cache per span, kept across steps."""

    def __init__(self, spans: list[Span]) -> None:
        self.spans = spans
        self.caches = [span.new_cache() for span in spans]
        self.position = 0
        self.prompt_tokens = 0  # no soft prompt
        self.token_ids: torch.Tensor | None = None
        self.pending_hypo_ids: torch.Tensor | None = None
        self.key_mask: torch.Tensor | None = None  # [batch, position] of a padded batch

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None or self.key_mask is not None:
            batch, new = hidden.shape[:2]
            kept = self.key_mask if self.key_mask is not None else torch.ones(batch, self.position, dtype=torch.bool)
            own = torch.ones(batch, new, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            self.key_mask = torch.cat([kept, own], dim=1)
        for span, cache in zip(self.spans, self.caches):
            hidden = span(hidden, cache, self.position, key_mask=self.key_mask, position_ids=position_ids)
        self.position += hidden.shape[1]
        return hidden

    def close(self) -> None:
        pass


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("family-models"))


def _split_model(case: FamilyCase, path: str) -> tuple[Any, list[Span]]:
    """The client model of ``case`` with its blocks in three in-process spans, and those spans."""
    from swarm import AutoDistributedModelForCausalLM

    config = load_config(path, **case.client_args)
    checkpoint = Checkpoint(path)
    spans = [load_span(checkpoint, config, start, end, torch.float32, CPU) for start, end in SPANS]
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[UNREACHABLE_PEER],
                                                            **case.client_args)
    model.generation_config.eos_token_id = None
    family = family_of(config)
    remote_layers = getattr(getattr(model, family.base_model_attr), family.layers_attr)
    assert len(remote_layers) == 1
    remote_layers[0].sequence = LocalSpans(spans)
    return model, spans


@pytest.mark.parametrize("case", CASES + EXTRA_CASES, ids=lambda case: case.name)
def test_spans_match_local_model(case: FamilyCase, models_dir: str) -> None:
    path, reference = family_cases.build(case, models_dir)
    local = family_cases.load_reference(case, reference)
    model, spans = _split_model(case, path)

    ids = _ids(2, 14, seed=0)
    with torch.no_grad():
        assert (model(ids).logits - local(ids).logits).abs().max().item() <= ATOL

        # multi-token steps after prefill, past the sliding window (5), equal the full forward
        hidden = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
        expected = hidden
        for span in spans:
            expected = span(expected)
        session = LocalSession(spans)
        steps = [session.step(hidden[:, a:b]) for a, b in ((0, 5), (5, 9), (9, 10), (10, 12))]
        assert (torch.cat(steps, dim=1) - expected).abs().max().item() <= ATOL

    # the server's batched steps over its paged cache: rows of different lengths equal each alone
    _check_batched_steps(spans, hidden)

    # the KV cache budget counts what a block really caches per token
    first_layer: Any = session.caches[0].layers[0]
    keys = first_layer.keys  # [batch, kv heads, tokens, head dim]
    assert kv_bytes_per_token(spans[0].config, torch.float32) == 2 * keys.shape[1] * keys.shape[3] * 4

    prompt = _ids(1, 7, seed=2)
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, session=LocalSession(spans))
    assert torch.equal(out, local.generate(prompt, max_new_tokens=10, do_sample=False))

    # a padded batch: left-padded rows of different lengths, in a forward with labels and in generate
    ids, mask = _left_padded(seed=3)
    with torch.no_grad():
        remote, expected = model(ids, attention_mask=mask, labels=ids), local(ids, attention_mask=mask, labels=ids)
    assert (remote.logits - expected.logits).abs().max().item() <= ATOL
    assert abs(remote.loss.item() - expected.loss.item()) <= ATOL
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, session=LocalSession(spans))
    assert torch.equal(out, local.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))


def _check_batched_steps(spans: list[Span], hidden: torch.Tensor) -> None:
    """Two sessions (2 rows after 9 tokens, 1 row after 4) step together through every span's batcher
    compute, each over its own pages, and equal the same steps alone over transformers' caches."""
    from server.batching import Part, run_rows
    from server.kv_cache import PagedKV, PagePool, SessionCache

    sessions = [(hidden, 9), (hidden[:1, 3:], 4)]  # ([rows, tokens, hidden], prefill)
    alone = [LocalSession(spans) for _ in sessions]
    expected = [[s.step(x[:, :n])] + [s.step(x[:, t:t + 1]) for t in range(n, n + 3)]
                for s, (x, n) in zip(alone, sessions)]
    got: list[list[torch.Tensor]] = [[], []]
    kvs = []
    for span in spans:
        pool = PagePool(1024, len(span.blocks), 8)
        kvs.append((PagedKV(pool, span.start, len(span.blocks), CPU), [SessionCache(pool, x.shape[0]) for x, _ in sessions]))
    states = [[x[:, :n] for x, n in sessions]] + [[x[:, t:t + 1] for x, n in sessions for t in [n + k]]
                                                  for k in range(3)]
    for k, step in enumerate(states):
        for span, (kv, caches) in zip(spans, kvs):
            if k == 0:  # prefills differ in length: each runs alone
                step = [run_rows(span, kv, [Part(c, h, 0)], span.start, span.end, torch.float32)[0]
                        for c, h in zip(caches, step)]
            else:
                step = run_rows(span, kv, [Part(c, h, c.length) for c, h in zip(caches, step)], span.start,
                                span.end, torch.float32)
        for i, out in enumerate(step):
            got[i].append(out)
    for outs, refs in zip(got, expected):
        for out, ref in zip(outs, refs):
            assert (out - ref).abs().max().item() <= ATOL * max(1.0, ref.abs().max().item())


def _left_padded(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 9, 5 and 8 tokens, left-padded to 9 with the pad id 0: (ids, attention mask)."""
    ids = _ids(3, 9, seed)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


# -- Baichuan: the translated config and tensors -------------------------------------------------------


def _write_config(path: str, **fields) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(fields, f)
    return path


BAICHUAN_FIELDS = dict(model_type="baichuan", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_hidden_layers=4, vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-6,
                       auto_map={"AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"})


def test_baichuan2_config_becomes_llama_with_norm_head(tmp_path) -> None:
    path = _write_config(str(tmp_path / "b2"), architectures=["BaichuanForCausalLM"], **BAICHUAN_FIELDS)
    config = load_config(path)  # no remote code runs: there is none in the directory
    assert config.model_type == "llama" and family_of(config) is FAMILIES["baichuan"]
    assert (config.num_key_value_heads, config.rope_parameters["rope_theta"]) == (4, 10000.0)
    assert getattr(config, NORM_HEAD_ATTR) is True


def test_baichuan1_7b_keeps_its_plain_head(tmp_path) -> None:
    path = _write_config(str(tmp_path / "b1"), architectures=["BaiChuanForCausalLM"],
                         **{**BAICHUAN_FIELDS, "vocab_size": 64000})
    assert getattr(load_config(path), NORM_HEAD_ATTR) is False


def test_baichuan_13b_layout_is_refused(tmp_path) -> None:
    fields = {k: v for k, v in BAICHUAN_FIELDS.items() if k != "max_position_embeddings"}
    path = _write_config(str(tmp_path / "b13"), model_max_length=4096, **fields)
    with pytest.raises(ModelError, match="13B.*7B layout"):
        load_config(path)


def test_baichuan_w_pack_is_split_into_q_k_v(models_dir: str) -> None:
    case = next(c for c in CASES if c.writer == "baichuan")
    path, reference = family_cases.build(case, models_dir)
    span = load_span(Checkpoint(path), load_config(path), 2, 3, torch.float32, CPU)
    local = family_cases.load_reference(case, reference)
    expected = local.model.layers[2].state_dict()
    got = span.blocks[0].state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


# -- remote code, unsupported models, the family list --------------------------------------------------


def test_remote_code_is_refused_unless_trusted(models_dir: str) -> None:
    from swarm import AutoDistributedModelForCausalLM

    case = next(c for c in CASES if c.writer == "remote_code")
    path, _ = family_cases.build(case, models_dir)
    with pytest.raises(ModelError, match=r"--trust-remote-code .* trust_remote_code=True"):
        load_config(path)
    with pytest.raises(ModelError, match="trust_remote_code=True"):
        AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[UNREACHABLE_PEER])
    config = load_config(path, trust_remote_code=True)
    assert family_of(config) is REMOTE_CODE_LAYOUT


def test_unsupported_architecture_lists_the_supported_ones(tmp_path) -> None:
    from swarm import AutoDistributedModelForCausalLM

    path = _write_config(str(tmp_path / "gpt2"), model_type="gpt2", n_embd=64, n_layer=2, n_head=4)
    for load in (lambda: load_config(path),
                 lambda: AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[UNREACHABLE_PEER])):
        with pytest.raises(ModelError, match="'gpt2'.*supported families: baichuan, bloom, .*qwen3_moe"):
            load()


def test_swarm_models_and_readme_list_every_family(monkeypatch, capsys) -> None:
    monkeypatch.setattr(swarm.cli, "_setup_logging", lambda verbose: None)
    assert swarm.cli.main(["models"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert listed == set(FAMILIES)
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    assert all(f"`{name}`" in readme for name in FAMILIES)


def test_every_family_is_tested() -> None:
    tested = {"baichuan" if case.writer == "baichuan" else case.model_type for case in CASES}
    assert tested >= set(FAMILIES)


def test_serve_flag_trust_remote_code() -> None:
    from swarm.config import ServerConfig

    args = swarm.cli.make_parser().parse_args(["serve", "--model", "m", "--trust-remote-code"])
    assert swarm.cli._build_config(ServerConfig, args).trust_remote_code is True
    args = swarm.cli.make_parser().parse_args(["serve", "--model", "m"])
    assert swarm.cli._build_config(ServerConfig, args).trust_remote_code is False


def test_native_family_ignores_the_code_its_repository_ships(tmp_path) -> None:
    """Old Phi-3 and Qwen repositories carry an ``auto_map``; the native classes serve them, no code runs."""
    path = _write_config(str(tmp_path / "llama-with-code"), model_type="llama", hidden_size=64,
                         intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=512,
                         auto_map={"AutoConfig": "configuration_x.XConfig",
                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    config = load_config(path)
    assert type(config).__module__.startswith("transformers.") and family_of(config) is FAMILIES["llama"]
