"""``swarm demo`` end to end, as a user runs it: the embedded default and a local model with a tokenizer."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _run_demo(*args: str, timeout: float = 300) -> str:
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "demo", *args], capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    workdir = re.search(r"logs in (\S+)", out.stdout).group(1)
    leftover = subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True).stdout.split()
    assert not leftover, f"the demo left processes running: {leftover}"
    return out.stdout


def test_demo_default_streams_through_the_chain():
    stdout = _run_demo("--max-new-tokens", "8")
    assert "Built a random-weight tiny Llama" in stdout
    assert "blocks 0:2 -> server" in stdout and "blocks 2:4 -> server" in stdout
    generated = stdout.split("Generated:")[1].splitlines()[0].split()
    assert len(generated) == 8 and all(t.isdigit() for t in generated)
    assert "Done." in stdout


def test_demo_with_a_local_model_and_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from swarm.tiny import make_tiny_model

    model_dir = make_tiny_model(str(tmp_path / "tiny-with-tokenizer"), "qwen3")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 1024)}}
    vocab.update({"hello": 3, "swarm": 4})
    del vocab["w3"], vocab["w4"]
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.save_pretrained(model_dir)
    assert os.path.isfile(os.path.join(model_dir, "tokenizer_config.json"))

    stdout = _run_demo("--model", model_dir, "--servers", "3", "--prompt", "hello swarm", "--max-new-tokens", "6")
    assert "Prompt: 'hello swarm'" in stdout
    assert stdout.count("-> server") == 3
    generated = stdout.split("Generated:")[1].splitlines()[0]
    assert generated.strip(), stdout
    assert "6 tokens in" in stdout
