"""``swarm finetune`` without a swarm: data formats, chat-template labels, truncation, LoRA targets,
the data order, and checkpoint save/resume with a small local model standing in for the swarm's.

The tokenizer is a byte-level BPE trained on the fly (swarm.tiny.make_tiny_tokenizer) with a
ChatML-like template: ``<|role|>\\n{content}<|end|>\\n`` per turn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import swarm.cli
from client.finetune import (
    Schedule,
    TrainerState,
    block_linear_names,
    checkpoints,
    default_target_modules,
    resolve_target_modules,
    run_key,
    save_final,
    train,
)
from client.finetune_data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    build_dataset,
    load_records,
    set_chat_template,
    to_messages,
    tokenize_conversation,
)
from swarm.command_config import FinetuneConfig
from swarm.config import INITIAL_PEERS_ENV
from swarm.errors import ConfigError, ModelError
from swarm.tiny import make_tiny_tokenizer

PEER = "/ip4/127.0.0.1/tcp/5/p2p/QmPeer"
CORPUS = ["Name three colors.", "Red, green and blue.", "Translate to French", "Hello, how are you?",
          "Bonjour", "You are a helpful assistant.", "What is two plus two? It is four."]


@pytest.fixture(autouse=True)
def no_env_peers(monkeypatch):
    monkeypatch.delenv(INITIAL_PEERS_ENV, raising=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is ~50x faster than two fighting a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer(texts=CORPUS)


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


# ---------------------------------------------------------------- files


def test_load_json_list_and_jsonl(tmp_path):
    items = [{"instruction": "a", "output": "b"}, {"conversations": [{"from": "human", "value": "x"}]}]
    records = load_records(write(tmp_path, "d.json", items))
    assert [r.data for r in records] == items and records[1].where == "example 1"
    jsonl = "\n".join(json.dumps(i) for i in items[:1]) + "\n\n" + json.dumps(items[1]) + "\n"
    records = load_records(write(tmp_path, "d.jsonl", jsonl))
    assert [r.data for r in records] == items and records[1].where == "example 1 (line 3)"


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ("  \n", "is empty"),
    ("[]", "holds no examples"),
    ("[{\"instruction\": 1,}]", "is not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": \n', r"line 2 is not valid JSON"),
    ('{\n "instruction": "a",\n "output": "b"\n}', r"line 1 is not valid JSON.*one example per line"),
    ('[{"instruction": "a", "output": "b"}, "text"]', r"example 1 is a str, not an object; expected alpaca"),
])
def test_bad_files(tmp_path, content, match):
    with pytest.raises(ConfigError, match=match):
        load_records(write(tmp_path, "d.json", content))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--data .*nope.json: cannot read it"):
        load_records(str(tmp_path / "nope.json"))


# ---------------------------------------------------------------- formats


def test_alpaca():
    assert to_messages({"instruction": "Add", "input": "2 and 2", "output": "4"}, "example 0") == ("alpaca", [
        {"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}])
    for item in ({"instruction": "Hi", "output": "Hello"}, {"instruction": "Hi", "input": "", "output": "Hello"}):
        assert to_messages(item, "example 0")[1][0] == {"role": "user", "content": "Hi"}


def test_sharegpt_roles():
    item = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U1"},
                              {"from": "gpt", "value": "A1"}, {"from": "user", "value": "U2"},
                              {"from": "assistant", "value": "A2"}], "id": "x"}
    kind, messages = to_messages(item, "example 0")
    assert kind == "sharegpt"
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2")]


def test_messages_format():
    item = {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    assert to_messages(item, "example 0") == ("messages", item["messages"])


@pytest.mark.parametrize("item, match", [
    ({"prompt": "p", "completion": "c"}, r"example 7 has fields \['completion', 'prompt'\]; expected alpaca "
                                         r"\{\"instruction\".*sharegpt \{\"conversations\""),
    ({"instruction": "i"}, r"example 7 has fields \['instruction'\]; expected alpaca"),
    ({"instruction": "i", "output": 3}, r"example 7: \"output\" must be a string, got int"),
    ({"conversations": []}, r"example 7: 'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "human"}]}, r"example 7: turn 0 of 'conversations' needs 'from' and 'value'"),
    ({"conversations": [{"from": "bot", "value": "v"}]}, r"example 7: turn 0 has from 'bot'; known: assistant, gpt"),
    ({"conversations": [{"from": "human", "value": "v"}]}, r"example 7 has no assistant turn"),
    ({"messages": [{"role": "gpt", "content": "v"}]}, r"turn 0 has role 'gpt'; known: system, user, assistant"),
])
def test_bad_examples_name_their_index(item, match):
    with pytest.raises(ConfigError, match=match):
        to_messages(item, "example 7")


def test_build_dataset_names_the_failing_jsonl_line(tmp_path, tokenizer):
    path = write(tmp_path, "d.jsonl", '{"instruction": "a", "output": "b"}\n\n{"question": "q"}\n')
    with pytest.raises(ConfigError, match=r"example 1 \(line 3\) has fields \['question'\]"):
        build_dataset(load_records(path), tokenizer, 64)


# ---------------------------------------------------------------- labels


CONVERSATION = {"conversations": [
    {"from": "system", "value": "You are a helpful assistant."},
    {"from": "human", "value": "Name three colors."},
    {"from": "gpt", "value": "Red, green and blue."},
    {"from": "human", "value": "Translate Hello to French"},
    {"from": "gpt", "value": "Bonjour"},
]}


@pytest.mark.parametrize("use_offsets", [True, False])
def test_multi_turn_labels_cover_exactly_the_assistant_turns(tokenizer, use_offsets):
    _, messages = to_messages(CONVERSATION, "example 0")
    example = tokenize_conversation(tokenizer, messages, 1000, use_offsets=use_offsets)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(example.labels) == len(example.input_ids) and not example.truncated
    assert trained_text(tokenizer, example) == "Red, green and blue.<|end|>\nBonjour<|end|>\n"
    # labels are the ids themselves where trained, in two contiguous runs (one per assistant turn)
    trained = [label != IGNORE_INDEX for label in example.labels]
    assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(example.input_ids, example.labels))
    runs = sum(1 for i, t in enumerate(trained) if t and (i == 0 or not trained[i - 1]))
    assert runs == 2
    # everything before the first assistant token is the system + user prompt, untrained
    first = trained.index(True)
    assert tokenizer.decode(example.input_ids[:first]).endswith("<|assistant|>\n")
    assert "Translate Hello to French" in tokenizer.decode(
        [t for t, k in zip(example.input_ids, trained) if not k])


def test_offsets_and_prefix_tokenization_agree(tokenizer):
    _, messages = to_messages(CONVERSATION, "example 0")
    assert (tokenize_conversation(tokenizer, messages, 1000, use_offsets=True)
            == tokenize_conversation(tokenizer, messages, 1000, use_offsets=False))


def test_truncation(tokenizer):
    _, messages = to_messages(CONVERSATION, "example 0")
    full = tokenize_conversation(tokenizer, messages, 1000)
    first = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = tokenize_conversation(tokenizer, messages, first + 3)
    assert cut.truncated and cut.input_ids == full.input_ids[:first + 3] and cut.labels == full.labels[:first + 3]
    assert tokenize_conversation(tokenizer, messages, first) is None  # no assistant token left


def test_build_dataset_skips_and_counts(tmp_path, tokenizer):
    items = [{"instruction": "Name three colors.", "output": "Red, green and blue."},
             {"instruction": "Hello, how are you? " * 20, "output": "Bonjour"},
             CONVERSATION]
    examples, stats = build_dataset(load_records(write(tmp_path, "d.json", items)), tokenizer, 40)
    assert len(examples) == 2 and stats.skipped == 1
    assert stats.formats == {"alpaca": 2, "sharegpt": 1}
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert all(len(e.input_ids) <= 40 for e in examples)
    assert "1 skipped" in stats.describe()


def test_fallback_template_for_a_tokenizer_without_one():
    bare = make_tiny_tokenizer(texts=CORPUS, chat_template=None)
    assert set_chat_template(bare) == "fallback" and bare.chat_template == FALLBACK_CHAT_TEMPLATE
    _, messages = to_messages({"instruction": "Name three colors.", "output": "Red, green and blue."}, "example 0")
    assert bare.apply_chat_template(messages, tokenize=False) == (
        "<s>### User:\nName three colors.\n\n### Assistant:\nRed, green and blue.</s>\n\n")
    example = tokenize_conversation(bare, messages, 1000)
    assert trained_text(bare, example) == "Red, green and blue.</s>\n\n"  # eos is learned: the model stops


def test_chat_template_file_and_tokenizer_template(tmp_path, tokenizer):
    assert set_chat_template(tokenizer) == "tokenizer"
    other = make_tiny_tokenizer(texts=CORPUS)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    assert set_chat_template(other, write(tmp_path, "t.jinja", template)) == "file"
    _, messages = to_messages({"instruction": "Hi", "output": "Bonjour"}, "example 0")
    assert trained_text(other, tokenize_conversation(other, messages, 100)) == "Bonjour\n"
    with pytest.raises(ConfigError, match="--chat-template .*missing.jinja: cannot read it"):
        set_chat_template(other, str(tmp_path / "missing.jinja"))


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # renders only the last assistant turn in full: earlier turns change when more follow
    odd = make_tiny_tokenizer(texts=CORPUS, chat_template=(
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|assistant|>\n...<|end|>\n"
        "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"))
    _, messages = to_messages(CONVERSATION, "example 4")
    with pytest.raises(ConfigError, match="example 4: the chat template renders turn 2 differently"):
        tokenize_conversation(odd, messages, 1000, "example 4")


def test_template_errors_name_the_example():
    strict = make_tiny_tokenizer(texts=CORPUS, chat_template=(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    _, messages = to_messages(CONVERSATION, "example 2")
    with pytest.raises(ConfigError, match="example 2: the chat template refused this conversation.*no system role"):
        tokenize_conversation(strict, messages, 1000, "example 2")


# ---------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize("names, targets", [
    (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj"],
     ("q_proj", "v_proj")),
    (["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h"], ("query_key_value",)),
    (["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"], ("qkv_proj",)),
    (["attn.wq", "attn.wo", "ffn.w1"], ("wo", "wq")),
])
def test_default_target_modules(names, targets):
    assert default_target_modules(names) == targets


def test_default_target_modules_needs_attention():
    with pytest.raises(ModelError, match="--lora-target-modules"):
        default_target_modules(["ffn.w1", "ffn.w2"])


def test_targets_from_a_real_block(tiny_llama):
    from swarm.models import load_config

    names = block_linear_names(load_config(tiny_llama))
    assert "self_attn.q_proj" in names and "mlp.down_proj" in names
    assert resolve_target_modules(names) == ("q_proj", "v_proj")
    assert resolve_target_modules(names, ("q_proj", "k_proj", "down_proj")) == ("q_proj", "k_proj", "down_proj")
    with pytest.raises(ConfigError, match="--lora-target-modules query: the model's blocks have no such Linear.*"
                                          "k_proj"):
        resolve_target_modules(names, ("q_proj", "query"))


# ---------------------------------------------------------------- data order


def test_schedule_is_a_seeded_shuffle_per_epoch():
    schedule = Schedule.plan(10, 3, seed=1, epochs=2, max_steps=None)
    assert schedule.steps_per_epoch == 4 and schedule.total_steps == 8
    steps = [schedule.step(s) for s in range(8)]
    assert [len(indices) for _, _, indices in steps] == [3, 3, 3, 1] * 2
    assert [position for _, position, _ in steps[:4]] == [3, 6, 9, 10]
    for epoch in (0, 1):
        seen = [i for e, _, indices in steps if e == epoch for i in indices]
        assert sorted(seen) == list(range(10))
    assert schedule.epoch_order(0) != schedule.epoch_order(1)
    assert schedule.epoch_order(0) == Schedule.plan(10, 3, 1, 2, None).epoch_order(0)
    assert schedule.epoch_order(0) != Schedule.plan(10, 3, 2, 2, None).epoch_order(0)
    assert Schedule.plan(10, 3, 1, epochs=2, max_steps=11).total_steps == 11
    assert Schedule.plan(10, 3, 1, epochs=2, max_steps=11).step(10)[0] == 2


# ---------------------------------------------------------------- training and checkpoints


class TinyLoraLM(torch.nn.Module):
    """A causal LM with frozen embeddings/head and a trainable low-rank update (with dropout):
    stands in for the swarm model, which the trainer only sees through this interface."""

    def __init__(self, vocab: int, hidden: int = 16, r: int = 4, fail_after: int | None = None):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)
        with torch.no_grad():
            for p in (self.embed.weight, self.head.weight, self.head.bias):
                p.copy_(torch.randn(p.shape, generator=generator))
                p.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(r, hidden, generator=generator) * 0.1)
        self.lora_B = torch.nn.Parameter(torch.zeros(hidden, r))
        self.dropout = torch.nn.Dropout(0.1)
        self.calls, self.fail_after = 0, fail_after

    def forward(self, *, input_ids, labels):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed")
        hidden = self.embed(input_ids)  # [1, seq, hidden]
        hidden = hidden + self.dropout(hidden) @ self.lora_A.T @ self.lora_B.T
        logits = self.head(hidden)  # [1, seq, vocab]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX)
        return types.SimpleNamespace(loss=loss, logits=logits)

    def save_adapter(self, path):
        save_file({"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()},
                  os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"r": self.lora_A.shape[0]}, f)

    def load_adapter(self, path):
        weights = load_file(os.path.join(path, "adapter_model.safetensors"))
        with torch.no_grad():
            self.lora_A.copy_(weights["lora_A"])
            self.lora_B.copy_(weights["lora_B"])


@pytest.fixture(scope="module")
def examples(tokenizer):
    items = [{"instruction": f"What is {a} plus {b}?", "output": f"It is {a + b}."} for a in range(4) for b in range(5)]
    return [tokenize_conversation(tokenizer, to_messages(item, "example")[1], 64) for item in items]


def finetune_config(output, **overrides) -> FinetuneConfig:
    values = dict(initial_peers=(PEER,), model="m", data="d.json", output=str(output), lr=0.05, epochs=2,
                  save_every=4, keep_checkpoints=2, lora_dropout=0.1)
    return FinetuneConfig(**{**values, **overrides})


RUN = {"data_sha256": "abc", "num_examples": 20}


def adapter_of(model):
    return model.lora_A.detach().clone(), model.lora_B.detach().clone()


def test_training_lowers_the_loss_and_checkpoints(tmp_path, tokenizer, examples):
    torch.manual_seed(0)
    model = TinyLoraLM(len(tokenizer))
    config = finetune_config(tmp_path / "out")
    state = train(model, examples, config, RUN, progress=False)
    assert state.step == state.total_steps == 40 and state.epoch == 1 and state.position == 20
    losses = [entry["loss"] for entry in state.log_history]
    assert [entry["step"] for entry in state.log_history] == list(range(1, 41))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    assert [step for step, _ in checkpoints(config.output)] == [36, 40]  # --keep-checkpoints 2
    files = sorted(os.listdir(os.path.join(config.output, "checkpoint-40")))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pt",
                     "trainer_state.json"]
    saved = TrainerState.from_json(open(os.path.join(config.output, "checkpoint-40", "trainer_state.json")).read(),
                                   "checkpoint-40")
    assert saved == state
    save_final(config.output, state, model)
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= set(os.listdir(config.output))
    assert not [n for n in os.listdir(config.output) if n.startswith(".tmp")]


def test_killed_run_resumes_to_the_same_adapter(tmp_path, tokenizer, examples, caplog):
    torch.manual_seed(0)
    whole = TinyLoraLM(len(tokenizer))
    reference = train(whole, examples, finetune_config(tmp_path / "whole"), RUN, progress=False)

    config = finetune_config(tmp_path / "out")
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="killed"):
        train(TinyLoraLM(len(tokenizer), fail_after=22), examples, config, RUN, progress=False)
    assert [step for step, _ in checkpoints(config.output)] == [16, 20]  # steps 21-22 are lost, no more
    os.makedirs(os.path.join(config.output, ".tmp-checkpoint-24-999"))  # killed while writing one

    torch.manual_seed(123)  # a fresh process: other RNG state, other adapter init
    resumed = TinyLoraLM(len(tokenizer))
    torch.nn.init.normal_(resumed.lora_B)
    caplog.set_level("INFO", logger="client.finetune")
    state = train(resumed, examples, config, RUN, progress=False)
    assert "Resuming from " + os.path.join(config.output, "checkpoint-20") + ": step 20 of 40 (epoch 0, 20 of 20" \
        in caplog.text
    assert resumed.calls == 20  # only the steps after the checkpoint ran
    assert state.step == 40 and state.log_history == reference.log_history
    for mine, theirs in zip(adapter_of(resumed), adapter_of(whole)):
        assert torch.equal(mine, theirs)
    assert not [n for n in os.listdir(config.output) if n.startswith(".tmp")]


def test_rerunning_a_finished_run_does_nothing(tmp_path, tokenizer, examples, caplog):
    config = finetune_config(tmp_path / "out", max_steps=4)
    train(TinyLoraLM(len(tokenizer)), examples, config, RUN, progress=False)
    again = TinyLoraLM(len(tokenizer))
    caplog.set_level("INFO", logger="client.finetune")
    assert train(again, examples, config, RUN, progress=False).step == 4 and again.calls == 0
    assert "Nothing to do" in caplog.text
    # more steps continue the same run
    more = TinyLoraLM(len(tokenizer))
    assert train(more, examples, dataclasses.replace(config, max_steps=6), RUN, progress=False).step == 6
    assert more.calls == 2


def test_a_checkpoint_of_another_run_is_refused(tmp_path, tokenizer, examples):
    config = finetune_config(tmp_path / "out", max_steps=4)
    train(TinyLoraLM(len(tokenizer)), examples, config, RUN, progress=False)
    with pytest.raises(ConfigError, match=r"checkpoint-4 is a checkpoint of a different run \(data_sha256: 'abc' "
                                          r"then, 'def' now\).*new --output"):
        train(TinyLoraLM(len(tokenizer)), examples, config, {**RUN, "data_sha256": "def"}, progress=False)


def test_interrupt_saves_a_checkpoint(tmp_path, tokenizer, examples):
    class Interrupted(TinyLoraLM):
        def forward(self, **kwargs):
            if self.calls == 6:
                raise KeyboardInterrupt
            return super().forward(**kwargs)

    config = finetune_config(tmp_path / "out", save_every=100)
    with pytest.raises(KeyboardInterrupt):
        train(Interrupted(len(tokenizer)), examples, config, RUN, progress=False)
    assert [step for step, _ in checkpoints(config.output)] == [6]


def test_no_trainable_parameters(tmp_path, tokenizer, examples):
    model = TinyLoraLM(len(tokenizer))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters.*lora="):
        train(model, examples, finetune_config(tmp_path / "out"), RUN, progress=False)


def test_run_key_covers_what_changes_the_run():
    key = run_key(finetune_config("out"), "abc", 20, ("q_proj", "v_proj"))
    assert key["lora_target_modules"] == ["q_proj", "v_proj"] and key["seed"] == 0
    assert run_key(finetune_config("out", lr=1.0), "abc", 20, ("q_proj", "v_proj")) == key  # lr may change
    assert run_key(finetune_config("out", seed=1), "abc", 20, ("q_proj", "v_proj")) != key


# ---------------------------------------------------------------- config and CLI


def test_cli_builds_finetune_config():
    args = swarm.cli.make_parser().parse_args(
        ["finetune", "--model", "m", "--data", "d.json", "--output", "o", "--initial-peers", PEER, "--lr", "1e-3",
         "--max-steps", "7", "--lora-target-modules", "q_proj", "k_proj"])
    config = swarm.cli._build_config(FinetuneConfig, args)
    assert config == FinetuneConfig(initial_peers=(PEER,), model="m", data="d.json", output="o", lr=1e-3,
                                    max_steps=7, lora_target_modules=("q_proj", "k_proj"))
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules[:0]) == (8, 16, 0.05, ())


def test_cli_finetune_requires_data_and_output(capsys):
    with pytest.raises(SystemExit):
        swarm.cli.make_parser().parse_args(["finetune", "--model", "m"])
    assert "--data, --output" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, match", [
    (dict(initial_peers=()), "swarm finetune needs --initial-peers"),
    (dict(data=""), "--data is required"),
    (dict(save_every=0), "--save-every must be at least 1"),
    (dict(max_steps=0), "--max-steps must be at least 1"),
    (dict(lr=0.0), "--lr must be a positive"),
    (dict(lora_dropout=1.0), r"--lora-dropout must be in \[0, 1\)"),
    (dict(dtype="int8"), "--dtype 'int8'"),
])
def test_finetune_config_checks(overrides, match):
    with pytest.raises(ConfigError, match=match):
        finetune_config("out", **overrides)


def test_cli_finetune_config_error_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(swarm.cli, "_setup_logging", lambda verbose: None)
    assert swarm.cli.main(["finetune", "--model", "m", "--data", "d", "--output", "o", "--initial-peers", PEER,
                           "--epochs", "0"]) == 2
    assert "error: --epochs must be at least 1" in capsys.readouterr().err
