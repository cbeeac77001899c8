"""Configs (swarm/config.py, NetworkConfig in swarm/dht.py) and the CLI parser (swarm/cli.py)."""

from __future__ import annotations

import dataclasses
import re

import pytest

import swarm.cli
from swarm.command_config import ApiConfig, VerifyConfig
from swarm.config import (
    INITIAL_PEERS_ENV,
    ClientConfig,
    DHTConfig,
    ServerConfig,
    default_prefix,
    env_initial_peers,
    parse_span,
)
from swarm.errors import ConfigError

PEER = "/ip4/1.2.3.4/tcp/5/p2p/QmPeer"
PEER2 = "/ip4/5.6.7.8/tcp/31337/p2p/12D3KooWabc"


@pytest.fixture(autouse=True)
def no_env_peers(monkeypatch):
    monkeypatch.delenv(INITIAL_PEERS_ENV, raising=False)


# ---------------------------------------------------------------- parse_span


@pytest.mark.parametrize("text, span", [("0:16", (0, 16)), (" 2 : 5 ", (2, 5)), ("7:8", (7, 8)),
                                        ("010:012", (10, 12))])
def test_parse_span_good(text, span):
    assert parse_span(text) == span


@pytest.mark.parametrize("text", ["", "5", "a:b", "0-4", "0:16:2", "-1:2", "1:-2", ":4", "4:", "1.5:3", None])
def test_parse_span_malformed(text):
    with pytest.raises(ConfigError, match=r"--blocks .* is not START:END"):
        parse_span(text)


@pytest.mark.parametrize("text", ["1:1", "3:2"])
def test_parse_span_start_not_below_end(text):
    with pytest.raises(ConfigError, match=r"--blocks .*START must be less than END"):
        parse_span(text)


def test_parse_span_bounds():
    assert parse_span("0:16", num_blocks=16) == (0, 16)
    assert parse_span("15:16", num_blocks=16) == (15, 16)
    with pytest.raises(ConfigError, match=r"--blocks '0:17': the model has 16 blocks \(0:16\)"):
        parse_span("0:17", num_blocks=16)
    with pytest.raises(ConfigError, match="--blocks"):
        parse_span("16:20", num_blocks=16)


# ---------------------------------------------------------------- default_prefix


@pytest.mark.parametrize("model, prefix", [
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"),
    ("meta-llama/Llama-3.1-8B", "Llama-3.1-8B"),
    ("gpt2", "gpt2"),
    ("/models/llama-3/", "llama-3"),
    ("/models/llama-3", "llama-3"),
    ("./checkpoints/my model//", "my_model"),
    ("relative/dir/tiny+llama@v2", "tiny_llama_v2"),
])
def test_default_prefix(model, prefix):
    assert default_prefix(model) == prefix


def test_server_config_dht_prefix():
    assert ServerConfig(model="Qwen/Qwen2.5-7B-Instruct").dht_prefix == "Qwen2.5-7B-Instruct"
    assert ServerConfig(model="Qwen/Qwen2.5-7B-Instruct", prefix="custom").dht_prefix == "custom"


# ---------------------------------------------------------------- ServerConfig / DHTConfig


def test_server_config_defaults():
    config = ServerConfig(model="x")
    assert config.initial_peers == () and config.host_maddrs == () and config.port is None
    assert config.blocks is None and config.cache_tokens > 0 and config.max_session_length > 0
    assert config.listen_maddrs() == ("/ip4/0.0.0.0/tcp/0",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = "y"


def test_listen_maddrs():
    assert ServerConfig(model="x", port=31337).listen_maddrs() == ("/ip4/0.0.0.0/tcp/31337",)
    assert ServerConfig(model="x", host_maddrs=("/ip4/127.0.0.1/tcp/0",)).listen_maddrs() == ("/ip4/127.0.0.1/tcp/0",)


def test_server_config_requires_model():
    with pytest.raises(ConfigError, match="--model is required"):
        ServerConfig()


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_bad_port(port):
    with pytest.raises(ConfigError, match=f"--port {port} is not a TCP port"):
        ServerConfig(model="x", port=port)
    with pytest.raises(ConfigError, match="--port"):
        DHTConfig(port=port)


def test_port_and_host_maddrs_conflict():
    with pytest.raises(ConfigError, match="either --port or --host-maddrs"):
        ServerConfig(model="x", port=1234, host_maddrs=("/ip4/0.0.0.0/tcp/1",))
    with pytest.raises(ConfigError, match="either --port or --host-maddrs"):
        DHTConfig(port=1234, host_maddrs=("/ip4/0.0.0.0/tcp/1",))


@pytest.mark.parametrize("field, flag", [
    ("cache_tokens", "--cache-tokens"),
    ("max_session_length", "--max-session-length"),
    ("max_batch_size", "--max-batch-size"),
    ("max_forward_tokens", "--max-forward-tokens"),
    ("update_period", "--update-period"),
    ("session_timeout", "--session-timeout"),
    ("num_threads", "--num-threads"),
])
@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_limits(field, flag, value):
    with pytest.raises(ConfigError, match=flag):
        ServerConfig(model="x", **{field: value})


def test_server_config_checks_blocks():
    assert ServerConfig(model="x", blocks="0:2").blocks == "0:2"
    with pytest.raises(ConfigError, match="--blocks"):
        ServerConfig(model="x", blocks="2:0")
    with pytest.raises(ConfigError, match="--blocks"):
        ServerConfig(model="x", blocks="all")


def test_server_config_reads_env_peers(monkeypatch):
    monkeypatch.setenv(INITIAL_PEERS_ENV, f"{PEER},{PEER2}")
    assert ServerConfig(model="x").initial_peers == (PEER, PEER2)
    assert DHTConfig().initial_peers == (PEER, PEER2)
    assert ServerConfig(model="x", initial_peers=()).initial_peers == ()  # explicit wins


# ---------------------------------------------------------------- ClientConfig


def test_client_config_requires_initial_peers():
    with pytest.raises(ConfigError, match=rf"initial_peers.*\${INITIAL_PEERS_ENV}"):
        ClientConfig()
    with pytest.raises(ConfigError, match="initial_peers"):
        ClientConfig(initial_peers=())


@pytest.mark.parametrize("value", [f"{PEER} {PEER2}", f"{PEER},{PEER2}", f" {PEER}, \n{PEER2} ,"])
def test_client_config_reads_env(monkeypatch, value):
    monkeypatch.setenv(INITIAL_PEERS_ENV, value)
    assert env_initial_peers() == (PEER, PEER2)
    assert ClientConfig().initial_peers == (PEER, PEER2)
    assert ClientConfig(initial_peers=(PEER2,)).initial_peers == (PEER2,)


def test_client_config_empty_env_is_no_peers(monkeypatch):
    monkeypatch.setenv(INITIAL_PEERS_ENV, " , ")
    assert env_initial_peers() == ()
    with pytest.raises(ConfigError, match="initial_peers"):
        ClientConfig()


@pytest.mark.parametrize("field", ["connect_timeout", "request_timeout", "missing_blocks_timeout"])
def test_client_config_timeouts_positive(field):
    with pytest.raises(ConfigError, match=f"{field} must be positive"):
        ClientConfig(initial_peers=(PEER,), **{field: 0})


def test_client_config_retries_are_budgeted_by_time():
    assert ClientConfig(initial_peers=(PEER,), retry_deadline=5.0).retry_policy.deadline == 5.0
    assert "max_retries" not in {f.name for f in dataclasses.fields(ClientConfig)}


# ---------------------------------------------------------------- NetworkConfig


def test_network_config_initial_peers():
    from swarm.dht import NetworkConfig

    assert NetworkConfig(initial_peers=(PEER, PEER2)).initial_peers == (PEER, PEER2)
    assert NetworkConfig().initial_peers == ()
    for bad in ("1.2.3.4:5", "/ip4/1.2.3.4/tcp/5", "QmPeer", "ip4/1.2.3.4/tcp/5/p2p/QmPeer"):
        with pytest.raises(ConfigError, match=f"initial peer '{bad}' is not a full multiaddr"):
            NetworkConfig(initial_peers=(PEER, bad))


# ---------------------------------------------------------------- CLI


def test_cli_serve_builds_server_config():
    args = swarm.cli.make_parser().parse_args(
        ["serve", "--model", "x", "--blocks", "0:2", "--initial-peers", PEER])
    assert args.command == "serve"
    config = swarm.cli._build_config(ServerConfig, args)
    assert isinstance(config, ServerConfig)
    assert config.initial_peers == (PEER,) and isinstance(config.initial_peers, tuple)
    assert config == ServerConfig(model="x", blocks="0:2", initial_peers=(PEER,))
    defaults = ServerConfig(model="x")
    for field in dataclasses.fields(ServerConfig):
        if field.name not in ("model", "blocks", "initial_peers"):
            assert getattr(config, field.name) == getattr(defaults, field.name), field.name


def test_cli_typed_flags():
    args = swarm.cli.make_parser().parse_args(
        ["serve", "--model", "m", "--cache-tokens", "100", "--update-period", "2.5", "--port", "4000",
         "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0", "--num-threads", "3"])
    assert args.cache_tokens == 100 and args.update_period == 2.5 and args.port == 4000 and args.num_threads == 3
    assert args.host_maddrs == ["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"]
    with pytest.raises(ConfigError, match="either --port or --host-maddrs"):
        swarm.cli._build_config(ServerConfig, args)


def test_cli_unset_env_peers_default(monkeypatch):
    monkeypatch.setenv(INITIAL_PEERS_ENV, PEER2)
    args = swarm.cli.make_parser().parse_args(["serve", "--model", "x"])
    assert swarm.cli._build_config(ServerConfig, args).initial_peers == (PEER2,)
    args = swarm.cli.make_parser().parse_args(["serve", "--model", "x", "--initial-peers"])
    assert swarm.cli._build_config(ServerConfig, args).initial_peers == ()


def test_quant_flag_and_client_filter():
    args = swarm.cli.make_parser().parse_args(["serve", "--model", "x", "--quant", "nf4"])
    assert swarm.cli._build_config(ServerConfig, args).quant == "nf4"
    assert ServerConfig(model="x").quant == "none"
    with pytest.raises(SystemExit):  # argparse names the choices
        swarm.cli.make_parser().parse_args(["serve", "--model", "x", "--quant", "int4"])
    with pytest.raises(ConfigError, match="--quant 'int4' is not one of none, int8, nf4"):
        ServerConfig(model="x", quant="int4")
    assert ClientConfig(initial_peers=(PEER,)).allowed_quant is None  # any server
    assert ClientConfig(initial_peers=(PEER,), allowed_quant="none").allowed_quant == ("none",)
    assert ClientConfig(initial_peers=(PEER,), allowed_quant=["int8", "nf4"]).allowed_quant == ("int8", "nf4")
    for bad in ((), ("",), (8,)):
        with pytest.raises(ConfigError, match="allowed_quant must be None"):
            ClientConfig(initial_peers=(PEER,), allowed_quant=bad)


def test_cli_every_config_field_has_a_flag():
    parser = swarm.cli.make_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    dests = {action.dest for action in serve._actions}
    assert {f.name for f in dataclasses.fields(ServerConfig)} <= dests


def test_cli_serve_requires_model(capsys):
    with pytest.raises(SystemExit) as info:
        swarm.cli.make_parser().parse_args(["serve", "--blocks", "0:2"])
    assert info.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_cli_rejects_bad_int(capsys):
    with pytest.raises(SystemExit):
        swarm.cli.make_parser().parse_args(["serve", "--model", "x", "--port", "http"])
    assert "--port" in capsys.readouterr().err


def test_cli_models(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(swarm.cli, "_setup_logging", calls.append)  # keep the test's logging untouched
    assert swarm.cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out.split()
    assert calls == [False]


def test_cli_config_error_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(swarm.cli, "_setup_logging", lambda verbose: None)
    assert swarm.cli.main(["dht", "--port", "0"]) == 2
    assert "error: --port 0 is not a TCP port" in capsys.readouterr().err


# ---------------------------------------------------------------- placement, throughput and relay flags


def test_placement_and_throughput_defaults():
    config = ServerConfig(model="x")
    assert config.num_blocks is None and config.throughput is None and config.network_rps is None
    assert config.balance_quality == 1.3 and config.rebalance_period > 0
    assert config.use_relay is True and config.use_auto_relay is False
    assert DHTConfig().use_relay is True


@pytest.mark.parametrize("kwargs, flag", [
    (dict(num_blocks=0), "--num-blocks must be positive"),
    (dict(num_blocks=2, blocks="0:2"), "either --blocks .* or --num-blocks"),
    (dict(throughput=0.0), "--throughput must be a positive, finite"),
    (dict(throughput=float("inf")), "--throughput"),
    (dict(throughput=float("nan")), "--throughput"),
    (dict(network_rps=-1.0), "--network-rps must be a positive"),
    (dict(balance_quality=0.9), "--balance-quality must be >= 1.0"),
    (dict(rebalance_period=0.0), "--rebalance-period must be positive"),
])
def test_placement_flags_are_checked(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ServerConfig(model="x", **kwargs)


def test_cli_placement_throughput_and_relay_flags():
    args = swarm.cli.make_parser().parse_args(
        ["serve", "--model", "m", "--num-blocks", "4", "--throughput", "12.5", "--network-rps", "800",
         "--balance-quality", "2", "--rebalance-period", "30", "--no-use-relay", "--use-auto-relay"])
    config = swarm.cli._build_config(ServerConfig, args)
    assert (config.num_blocks, config.throughput, config.network_rps) == (4, 12.5, 800.0)
    assert (config.balance_quality, config.rebalance_period) == (2.0, 30.0)
    assert config.use_relay is False and config.use_auto_relay is True
    args = swarm.cli.make_parser().parse_args(["dht", "--no-use-relay"])
    assert swarm.cli._build_config(DHTConfig, args).use_relay is False


def test_relayed_addresses():
    from swarm.dht import all_relayed

    relay = "/ip4/1.2.3.4/tcp/5/p2p/QmRelay/p2p-circuit/p2p/QmMe"
    direct = "/ip4/10.0.0.5/tcp/31337/p2p/QmMe"
    assert all_relayed([relay]) and all_relayed([relay, relay.replace("1.2.3.4", "5.6.7.8")])
    assert not all_relayed([relay, direct]) and not all_relayed([direct]) and not all_relayed([])


# ---------------------------------------------------------------- swarm api


def test_cli_api_builds_api_config(tmp_path):
    args = swarm.cli.make_parser().parse_args(
        ["api", "--initial-peers", PEER, "--port", "0", "--api-key", "k", "--model", "a", "b/c",
         "--adapter", "x=/p/x", "y=/p/y", "--max-concurrent", "4"])
    config = swarm.cli._build_config(ApiConfig, args)
    assert config == ApiConfig(initial_peers=(PEER,), port=0, api_key="k", model=("a", "b/c"),
                               adapter=("x=/p/x", "y=/p/y"), max_concurrent=4)
    assert config.adapter_paths() == {"x": "/p/x", "y": "/p/y"}
    api = swarm.cli.make_parser()._subparsers._group_actions[0].choices["api"]
    assert {f.name for f in dataclasses.fields(ApiConfig)} <= {action.dest for action in api._actions}


@pytest.mark.parametrize("kwargs, match", [
    (dict(initial_peers=()), "swarm api needs --initial-peers"),
    (dict(port=70000), "--port 70000"),
    (dict(api_key=" "), "--api-key must not be empty"),
    (dict(max_concurrent=0), "--max-concurrent must be at least 1"),
    (dict(default_max_tokens=0), "--default-max-tokens"),
    (dict(dtype="int8"), "--dtype 'int8'"),
    (dict(adapter=("noequals",)), "is not NAME=PATH"),
    (dict(adapter=("a=/x", "a=/y")), "names 'a' twice"),
])
def test_api_config_checks(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ApiConfig(**{"initial_peers": (PEER,), **kwargs})


# ---------------------------------------------------------------- first mistakes: one-line answers


def test_default_prefix_of_a_hub_cache_snapshot_is_its_repository():
    snapshot = "/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-7B-Instruct/snapshots/a09a35458c702b33/"
    assert default_prefix(snapshot) == "Qwen2.5-7B-Instruct" == default_prefix("Qwen/Qwen2.5-7B-Instruct")


def test_dht_prefix_is_the_one_name_and_prefix_its_old_spelling():
    assert ServerConfig(model="x", dht_prefix="custom").dht_prefix == "custom"
    with pytest.raises(ConfigError, match="--prefix 'a' and --dht-prefix 'b' disagree"):
        ServerConfig(model="x", prefix="a", dht_prefix="b")
    args = swarm.cli.make_parser().parse_args(["serve", "--model", "x", "--dht-prefix", "p"])
    assert swarm.cli._build_config(ServerConfig, args).dht_prefix == "p"


@pytest.mark.parametrize("addr, problem", [
    ("/ip4/10.0.0.256/tcp/31337/p2p/QmPeer", "'10.0.0.256' is not an IPv4 address"),
    ("/ip4/10.0.0.5/tcp/313370/p2p/QmPeer", "'313370' is not a TCP port"),
    ("/ip6/10.0.0.5/tcp/1/p2p/QmPeer", "is not an IPv6 address"),
    ("/ip4/10.0.0.5/tcp/1/p2p/", "/p2p needs a value"),
])
def test_initial_peers_are_checked_in_every_role(addr, problem):
    for make in (lambda: ServerConfig(model="x", initial_peers=(addr,)), lambda: DHTConfig(initial_peers=(addr,)),
                 lambda: ClientConfig(initial_peers=(addr,))):
        with pytest.raises(ConfigError, match=re.escape(problem)):
            make()
    assert ServerConfig(model="x", initial_peers=("/dns4/swarm.example.org/tcp/31337/p2p/QmPeer",)).initial_peers
    assert DHTConfig(initial_peers=("/ip6/::1/tcp/1/p2p/QmPeer", "/ip4/1.2.3.4/udp/5/quic-v1/p2p/QmPeer"))


def test_remeasure_throughput_flag():
    assert ServerConfig(model="x", remeasure_throughput=True).remeasure_throughput is True
    with pytest.raises(ConfigError, match="either --throughput .* or --remeasure-throughput"):
        ServerConfig(model="x", throughput=5.0, remeasure_throughput=True)


# ---------------------------------------------------------------- model sources: every form that loads passes


@pytest.fixture
def gguf_layout(tmp_path, monkeypatch):
    """A GGUF file in a folder, the same file in a hub-cache snapshot (a symlink to its blob, as
    huggingface_hub lays it out), and a folder without config.json; the working directory is tmp_path."""
    from hub_layout import make_hub_cache

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m.Q4_K_M.gguf").write_bytes(b"GGUF")  # the check reads no content; swarm.gguf does
    snapshot = make_hub_cache(tmp_path / "hub", "org/m-GGUF", folder, files=["m.Q4_K_M.gguf"])
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return folder, snapshot


@pytest.mark.parametrize("model, gguf_file", [
    ("{folder}/m.Q4_K_M.gguf", None),  # the file itself
    ("models/m.Q4_K_M.gguf", None),  # relative to the working directory
    ("{folder}", "m.Q4_K_M.gguf"),  # a folder and the file in it
    ("{folder}/", "m.Q4_K_M.gguf"),
    ("{snapshot}", "m.Q4_K_M.gguf"),  # a hub-cache snapshot (the file a symlink to its blob)
    ("{snapshot}/m.Q4_K_M.gguf", None),
    ("org/m-GGUF", "m.Q4_K_M.gguf"),  # a hub repository: downloaded when the server starts
])
def test_every_gguf_form_that_loads_passes_the_check(gguf_layout, model, gguf_file):
    folder, snapshot = gguf_layout
    model = model.replace("{folder}", str(folder)).replace("{snapshot}", str(snapshot))
    config = ServerConfig(model=model, gguf_file=gguf_file)
    assert config.dht_prefix == "m.Q4_K_M.gguf"  # what a client opening the same file looks under


def test_finetune_says_it_reads_no_gguf(gguf_layout):
    from swarm.command_config import FinetuneConfig

    with pytest.raises(ConfigError, match="swarm finetune does not read GGUF files; pass the model's hub id or "
                                          "directory, and --dht-prefix"):
        FinetuneConfig(model="models/m.Q4_K_M.gguf", data="d.json", output="o", initial_peers=(PEER,))


@pytest.mark.parametrize("model, gguf_file, message", [
    ("models/absent.gguf", None, "GGUF file 'models/absent.gguf' does not exist; for a file in a hub repository "
                                 "pass --model ORG/REPO --gguf-file NAME.gguf"),
    ("models", "absent.gguf", "--model 'models' has no GGUF file 'absent.gguf' (--gguf-file) (it holds "
                              "'m.Q4_K_M.gguf')"),
    ("models", None, "--model 'models' has no config.json (it holds 'm.Q4_K_M.gguf': pass that file, or "
                     "--gguf-file m.Q4_K_M.gguf)"),
    ("models/m.Q4_K_M.gguf", "m.Q4_K_M.gguf", "is a file, and --gguf-file names a file inside a directory or hub "
                                              "repository: pass --model models --gguf-file m.Q4_K_M.gguf"),
    ("empty", "m.gguf", "--model 'empty' has no GGUF file 'm.gguf' (--gguf-file)"),
    ("~/models", None, "--model '~/models': no such directory"),  # not expanded, as transformers would not
])
def test_gguf_forms_that_cannot_load_are_refused_in_one_line(gguf_layout, model, gguf_file, message):
    from swarm.errors import ModelError

    with pytest.raises(ModelError) as info:
        ServerConfig(model=model, gguf_file=gguf_file)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_verify_rate_and_swarm_verify_flags():
    assert ClientConfig(initial_peers=(PEER,)).verify_rate == 0.05
    assert ClientConfig(initial_peers=(PEER,), verify_rate=0).verify_rate == 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="verify_rate must be within 0..1"):
            ClientConfig(initial_peers=(PEER,), verify_rate=bad)
    args = swarm.cli.make_parser().parse_args(["verify", "--model", "m", "--initial-peers", PEER, "--rounds", "0",
                                               "--steps", "4"])
    config = swarm.cli._build_config(VerifyConfig, args)
    assert (config.rounds, config.steps, config.prompt_tokens, config.period) == (0, 4, 16, 60.0)
    for fields, flag in (({"steps": 0}, "--steps"), ({"rounds": -1}, "--rounds"), ({"period": 0}, "--period"),
                         ({"model": ""}, "--model")):
        with pytest.raises(ConfigError, match=flag):
            VerifyConfig(**{"model": "m", "initial_peers": (PEER,), **fields})
    with pytest.raises(ConfigError, match="swarm verify needs --initial-peers"):
        VerifyConfig(model="m", initial_peers=())
