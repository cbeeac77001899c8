"""What a swarm serves, in words (swarm/served.py): finding a model by prefix or config.json, the lines of
``swarm models --initial-peers``, the MissingBlocksError sentence and the fix command. Pure, no peers."""

from __future__ import annotations

import pytest

from swarm.config import default_prefix
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.served import describe_served, find_prefix, same_config, serve_command, served_line, summarize

PEERS = ("/ip4/10.0.0.5/tcp/31337/p2p/12D3KooWExample",)
INDEX = {
    "Qwen2.5-7B-Instruct": ModelRecord("Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", 28, "qwen2", config_digest="q" * 16),
    "tiny-llama": ModelRecord("tiny-llama", "/home/alice/models/tiny-llama", 4, "llama", config_digest="t" * 16),
}


def test_find_prefix_by_name_then_by_config():
    assert find_prefix(INDEX, "tiny-llama", "t" * 16, 4) == "tiny-llama"
    assert find_prefix(INDEX, "my-copy", "t" * 16, 4) == "tiny-llama"  # the same model in another folder
    assert find_prefix(INDEX, "my-copy", "t" * 16, 8) is None  # same config digest, other block count: not it
    assert find_prefix(INDEX, "my-copy", "x" * 16, 4) is None
    assert find_prefix(INDEX, "my-copy", "", 4) is None  # a record without a digest never matches
    twins = {**INDEX, "tiny-llama-chat": ModelRecord("tiny-llama-chat", "org/tiny-llama-chat", 4, "llama", config_digest="t" * 16)}
    assert find_prefix(twins, "my-copy", "t" * 16, 4) is None  # two candidates: the client asks to choose
    assert same_config(twins, "t" * 16, 4) == ["tiny-llama", "tiny-llama-chat"]


def test_served_line_names_the_prefix_and_the_alternatives():
    line = served_line("my-copy", INDEX)
    assert line.startswith("Looked under DHT prefix 'my-copy', which no server announced; the swarm serves "
                           "'Qwen2.5-7B-Instruct' (Qwen/Qwen2.5-7B-Instruct), "
                           "'tiny-llama' (/home/alice/models/tiny-llama)")
    assert "dht_prefix=" in line and "swarm models --initial-peers" in line
    assert "index is empty" in served_line("x", {})
    assert served_line("tiny-llama", INDEX) is None  # served there: the missing blocks are the news


@pytest.mark.parametrize("record, prefix, expected", [
    (INDEX["Qwen2.5-7B-Instruct"], "Qwen2.5-7B-Instruct",
     "swarm serve --model Qwen/Qwen2.5-7B-Instruct --blocks 3:8 --initial-peers " + PEERS[0]),
    (INDEX["Qwen2.5-7B-Instruct"], "qwen-private",
     "swarm serve --model Qwen/Qwen2.5-7B-Instruct --blocks 3:8 --dht-prefix qwen-private --initial-peers " + PEERS[0]),
    # a path of the machine that started the model is no use elsewhere; the prefix finds the model
    (INDEX["tiny-llama"], "tiny-llama",
     "swarm serve --model /path/to/tiny-llama --blocks 3:8 --dht-prefix tiny-llama --initial-peers " + PEERS[0]),
])
def test_serve_command_can_be_pasted_on_another_machine(record, prefix, expected):
    assert serve_command(record, prefix, [3, 4, 7], PEERS) == expected
    assert "/home/alice" not in serve_command(record, prefix, [3], PEERS)
    assert default_prefix("/path/to/tiny-llama") == "tiny-llama"
    assert serve_command(record, prefix, [3], ()).endswith(" --initial-peers SWARM_ADDRESS")  # never none at all


def test_summarize_and_describe():
    servers = {"tiny-llama": {b: {"A": ServerRecord(ServerState.ONLINE, 0, 2)} for b in range(2)}}
    served = summarize(INDEX, servers)
    assert [m.prefix for m in served] == ["Qwen2.5-7B-Instruct", "tiny-llama"]
    lines = describe_served(served)
    assert "'tiny-llama' (/home/alice/models/tiny-llama, llama, 4 blocks, 1 server(s)): broken: blocks 2:4 " \
           "have no server" in lines[2]
    assert "28 blocks, 0 server(s)): broken: blocks 0:28" in lines[1]
    assert describe_served([])[0].startswith("This swarm serves no model yet")


@pytest.mark.parametrize("name, prefix, expected", [
    # a GGUF file of a hub repository: the repository and --gguf-file, whose name is the default prefix
    ("org/m-GGUF/m.Q4_K_M.gguf", "m.Q4_K_M.gguf", "--model org/m-GGUF --gguf-file m.Q4_K_M.gguf --blocks 3:4 "
                                                  "--initial-peers"),
    ("org/m-GGUF/m.Q4_K_M.gguf", "mine", "--model org/m-GGUF --gguf-file m.Q4_K_M.gguf --blocks 3:4 "
                                         "--dht-prefix mine --initial-peers"),
    # a local GGUF file, absolute or relative: a path of that machine
    ("/home/alice/m.Q4_K_M.gguf", "m.Q4_K_M.gguf", "--model /path/to/m.Q4_K_M.gguf --blocks 3:4 --dht-prefix "
                                                   "m.Q4_K_M.gguf --initial-peers"),
    ("m.Q4_K_M.gguf", "m.Q4_K_M.gguf", "--model /path/to/m.Q4_K_M.gguf --blocks 3:4 --dht-prefix m.Q4_K_M.gguf"),
    ("/home/alice/models/tiny-llama/", "tiny-llama", "--model /path/to/tiny-llama --blocks 3:4 --dht-prefix "
                                                     "tiny-llama"),
])
def test_serve_command_for_gguf_and_local_names(name, prefix, expected):
    command = serve_command(ModelRecord(prefix, name, 4, "llama"), prefix, [3], PEERS)
    assert command.startswith(f"swarm serve {expected}") and "alice" not in command
