"""Training throughput through a swarm on 127.0.0.1, optionally side by side with Petals. Prints JSON.

    python benchmarks/bench_training.py                            # Swarm only, tiny Llama (hidden 64, 4 layers)
    python benchmarks/bench_training.py --petals --workdir /tmp/pb # also Petals 2.2 deep prompt tuning

Two servers (blocks 0:2 and 2:4, one torch thread each) and one client train on batches of
``--batch`` x ``--seq-len`` random tokens (the same batches everywhere: batch i is drawn from seed
1000 + i) with AdamW on the parameters that require grad:

- Swarm, LoRA (r=8, alpha=16, q_proj and v_proj of every block; lora_B drawn at random so that the
  first step already exercises the adapter), and Swarm, deep prompt tuning (``pre_seq_len`` soft
  prompt tokens before the input and before every block);
- local transformers + peft with the same LoRA weights and batches (the ratio base), and local
  transformers with the same deep prompts added by hooks; the first step's loss must equal Swarm's
  (``first_step_loss_equal_local``: within 1e-5), and the largest loss difference over all steps is
  reported (AdamW may amplify rounding);
- with ``--petals``: Petals 2.2.0.post1 deep prompt tuning (its client supports no LoRA training)
  from the venv of ``../shared/bench/petals_baseline.sh`` (run once if the venv is missing): its own
  DHT peer and two servers (0:2, 2:4) on the same model directory, started before and stopped after
  Petals' client, before Swarm's processes start. Its soft prompts start from the same values as
  Swarm's, so its first loss is checked against local transformers too, in Petals' convention: Petals
  drops the prompt positions before the head, so the first input token is not scored (Swarm's loss,
  like a local model given the prompts as input embeddings with label -100, scores it).

Each run does ``--warmup`` steps and then ``--steps`` timed ones. Reported: forward+backward tokens/s
(input tokens, soft prompt positions not counted; median), seconds per optimizer step (forward,
backward, ``optimizer.step()`` and ``zero_grad()``; median), the per-step times, and the losses.
This machine is shared and noisy: compare ratios from one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from swarm.dht import clean_peer_sockets, peer_sockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from petals_training import ensure_petals, run_petals  # noqa: E402  (the Petals side, in its own venv)

LORA_TARGETS = ["q_proj", "v_proj"]
EXACT_ATOL = 1e-5


def batch(step: int, size: int, length: int) -> torch.Tensor:
    return torch.randint(3, 1000, (size, length), generator=torch.Generator().manual_seed(1000 + step))


def train(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """``--warmup`` + ``--steps`` AdamW steps of ``model(input_ids, labels).loss``; timings of the last ``--steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    tokens = args.batch * args.seq_len
    fwd_bwd, steps, losses = [], [], []
    for i in range(args.warmup + args.steps):
        ids = batch(i, args.batch, args.seq_len)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t2 = time.perf_counter()
        losses.append(loss.item())
        if i >= args.warmup:
            fwd_bwd.append(t1 - t0)
            steps.append(t2 - t0)
    return {
        "trainable_params": sum(p.numel() for p in params),
        "tokens_per_step": tokens,
        "fwd_bwd_tokens_per_s_median": round(tokens / statistics.median(fwd_bwd), 1),
        "s_per_optimizer_step_median": round(statistics.median(steps), 4),
        "step_times_s": [round(t, 4) for t in steps],
        "losses": [round(x, 6) for x in losses],
        "first_step_loss": losses[0],
    }


class LocalDeepPtune(torch.nn.Module):
    """Local transformers with deep prompts: ``prompts`` before the input embeddings, ``deep[i]`` added
    to the prompt positions before block i (what Swarm's and Petals' servers do)."""

    def __init__(self, local: Any, prompts: torch.Tensor, deep: torch.Tensor):
        super().__init__()
        self.local = local.requires_grad_(False)
        self.prompts = torch.nn.Parameter(prompts.clone())
        self.deep = torch.nn.Parameter(deep.clone())
        for i, layer in enumerate(local.model.layers):
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            prompt = self.deep[index]
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = torch.cat([hidden[:, :prompt.shape[0]] + prompt, hidden[:, prompt.shape[0]:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.prompts.unsqueeze(0).expand(input_ids.shape[0], -1, -1),
                          self.local.get_input_embeddings()(input_ids)], dim=1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """Swarm's loss: the last prompt position predicts the first token too."""
        labels = torch.cat([torch.full((input_ids.shape[0], self.prompts.shape[0]), -100), labels], dim=1)
        return self.local(inputs_embeds=self._embeds(input_ids), labels=labels)

    def petals_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Petals' loss: its model drops the prompt positions before the head, so the first token is not scored."""
        logits = self.local(inputs_embeds=self._embeds(input_ids)).logits[:, self.prompts.shape[0]:]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def initial_prompts(model_dir: str, pre_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft prompts every deep prompt tuning run starts from: [tokens, hidden], [blocks, tokens, hidden]."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    generator = torch.Generator().manual_seed(5)
    prompts = torch.randn(pre_seq_len, config["hidden_size"], generator=generator) * 0.02
    deep = torch.randn(config["num_hidden_layers"], pre_seq_len, config["hidden_size"], generator=generator) * 0.1
    return prompts, deep


def run_swarm(model_dir: str, args: argparse.Namespace, workdir: str) -> tuple[dict, dict]:
    from peft import LoraConfig

    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm

    res: dict = {"spans": args.spans.split(",")}
    init: dict = {}
    extra = ["--num-threads", str(args.server_threads)]
    with LocalSwarm(log_dir=os.path.join(workdir, "swarm_train_logs")) as swarm:
        swarm.start_dht()
        starts = []
        for span in res["spans"]:
            t0 = time.monotonic()
            swarm.start_server(model_dir, span, *extra)
            starts.append(round(time.monotonic() - t0, 2))
        res["server_start_to_online_s"] = starts

        torch.manual_seed(0)
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                lora=lora)
        try:
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for b in model.tuning.lora.lora_B:
                    b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
            init["adapter"] = os.path.join(workdir, "swarm_train_initial_adapter")
            model.save_adapter(init["adapter"])
            model.train()
            res["lora"] = train(model, args)
            res["lora"]["lora_modules"] = len(model.tuning.lora.targets)
        finally:
            model.shutdown()

        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                tuning_mode="deep_ptune", pre_seq_len=args.pre_seq_len)
        try:
            prompts, deep = initial_prompts(model_dir, args.pre_seq_len)
            with torch.no_grad():
                model.tuning.prompt_embeddings.copy_(prompts)
                model.tuning.intermediate_prompts.copy_(deep)
            model.train()
            res["deep_ptune"] = train(model, args)
        finally:
            model.shutdown()
    return res, init


def run_local(model_dir: str, args: argparse.Namespace, init: dict) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.local_threads)
    try:
        res: dict = {"torch_threads": args.local_threads}
        model = PeftModel.from_pretrained(base(), init["adapter"], is_trainable=True)
        model.train()
        res["lora_peft"] = train(model, args)
        prompts = initial_prompts(model_dir, args.pre_seq_len)
        res["deep_ptune_hooks"] = train(LocalDeepPtune(base(), *prompts).train(), args)
        with torch.no_grad():
            res["deep_ptune_hooks"]["first_step_loss_petals_convention"] = LocalDeepPtune(base(), *prompts).petals_loss(
                batch(0, args.batch, args.seq_len)).item()
    finally:
        torch.set_num_threads(threads)
    return res


# ---------------------------------------------------------------- Petals (its own venv, its own processes)

def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local Llama directory (default: a tiny random Llama; with --petals the "
                                        "one petals_baseline.sh writes)")
    parser.add_argument("--petals", action="store_true", help="also train with Petals deep prompt tuning")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "swarm-bench"),
                        help="scratch files; with --petals, where petals_baseline.sh's venv-petals is (or goes)")
    parser.add_argument("--spans", default="0:2,2:4")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="timed steps (medians over these)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--pre-seq-len", type=int, default=16, help="soft prompt tokens for deep prompt tuning")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads per server, Swarm's and Petals' (OMP_NUM_THREADS for Petals)")
    parser.add_argument("--client-threads", type=int, default=1)
    parser.add_argument("--local-threads", type=int, default=1,
                        help="torch threads for the local transformers references (2 threads on this shared "
                             "2-core machine gave 0.05-1.4 s per step)")
    parser.add_argument("--dht-port", type=int, default=31337, help="Petals' DHT port (another if it is taken)")
    parser.add_argument("--petals-client-timeout", type=int, default=900)
    args = parser.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # run the clean-ups (finally blocks) when stopped too
        signal.signal(sig, _exit_on_signal)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    torch.set_num_threads(args.client_threads)

    t_start = time.monotonic()
    report: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
                    "config": {k: getattr(args, k) for k in ("batch", "seq_len", "warmup", "steps", "lora_r",
                                                             "pre_seq_len", "lr", "server_threads",
                                                             "client_threads", "local_threads")}}
    report["config"]["lora_targets"] = LORA_TARGETS
    model_dir = args.model
    if args.petals:
        venv_python, shim, petals_model, info = ensure_petals(workdir)
        model_dir = model_dir or petals_model
        try:
            prompts, deep = initial_prompts(model_dir, args.pre_seq_len)
            report["petals_deep_ptune"] = {**info, **run_petals(workdir, venv_python, shim, model_dir, args,
                                                                prompts, deep)}
        except Exception as e:  # noqa: BLE001  (Swarm's side still runs and is reported)
            report["petals_deep_ptune"] = {**info, "error": f"{type(e).__name__}: {e}"}
    if model_dir is None:
        from swarm.tiny import make_tiny_model

        model_dir = make_tiny_model(os.path.join(workdir, "tiny-llama"))
    report["model"] = model_dir
    sockets_before = peer_sockets()
    try:
        report["swarm"], init = run_swarm(model_dir, args, workdir)
        report["local_transformers"] = local = run_local(model_dir, args, init)
    finally:  # a client's p2pd may exit after the swarm's own clean-up ran
        clean_peer_sockets(keep=sockets_before)

    swarm = report["swarm"]
    for mode, ref in (("lora", "lora_peft"), ("deep_ptune", "deep_ptune_hooks")):
        ours, theirs = swarm[mode]["losses"], local[ref]["losses"]
        swarm[mode]["first_step_loss_abs_diff_vs_local"] = abs(ours[0] - theirs[0])
        swarm[mode]["first_step_loss_equal_local"] = abs(ours[0] - theirs[0]) <= EXACT_ATOL
        swarm[mode]["loss_max_abs_diff_vs_local_all_steps"] = max(abs(a - b) for a, b in zip(ours, theirs))
    base = local["lora_peft"]["fwd_bwd_tokens_per_s_median"]
    ratios = {
        "swarm_lora_over_local_peft_tokens_per_s": round(swarm["lora"]["fwd_bwd_tokens_per_s_median"] / base, 3),
        "swarm_deep_ptune_over_local_peft_tokens_per_s": round(
            swarm["deep_ptune"]["fwd_bwd_tokens_per_s_median"] / base, 3),
    }
    petals = report.get("petals_deep_ptune")
    if petals and "error" not in petals:
        p_tps = petals["fwd_bwd_tokens_per_s_median"]
        ratios.update({
            "petals_deep_ptune_over_local_peft_tokens_per_s": round(p_tps / base, 3),
            "swarm_lora_over_petals_deep_ptune_tokens_per_s": round(swarm["lora"]["fwd_bwd_tokens_per_s_median"]
                                                                    / p_tps, 2),
            "swarm_deep_ptune_over_petals_deep_ptune_tokens_per_s": round(
                swarm["deep_ptune"]["fwd_bwd_tokens_per_s_median"] / p_tps, 2),
            "swarm_deep_ptune_over_petals_deep_ptune_s_per_step": round(
                swarm["deep_ptune"]["s_per_optimizer_step_median"] / petals["s_per_optimizer_step_median"], 3),
        })
        diff = abs(petals["first_step_loss"] - local["deep_ptune_hooks"]["first_step_loss_petals_convention"])
        petals["first_step_loss_abs_diff_vs_local"] = diff
        petals["first_step_loss_equal_local"] = diff <= EXACT_ATOL
    report["ratios"] = ratios
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = round(time.monotonic() - t_start, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
