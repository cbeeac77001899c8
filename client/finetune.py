"""``swarm finetune``: train a LoRA adapter for a swarm model on instruction data, resumably.

The servers' weights stay frozen; the adapter's weights live in this process (the model is built
with ``lora=``) and AdamW updates them from the gradients the swarm returns. One example runs at a
time (batch of one; ``--gradient-accumulation`` examples make one optimizer step). The data order
of each epoch is a shuffle seeded by ``(seed, epoch)``, so step ``s`` always trains on the same
examples and a resumed run continues exactly where the checkpoint left off.

Checkpoints (docs/finetune.md): every ``--save-every`` steps, ``OUTPUT/checkpoint-STEP/`` holds the
adapter (PEFT format), ``optimizer.pt``, ``rng_state.pt`` and ``trainer_state.json``. A checkpoint is
written to a hidden temporary directory and renamed into place, so a run killed at any moment
leaves only whole checkpoints; a new run with the same ``--output`` resumes from the latest one.
The final adapter is written to ``OUTPUT/`` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch

from swarm.command_config import FinetuneConfig
from swarm.errors import ConfigError, ModelError

from client.finetune_data import Example, build_dataset, load_records, set_chat_template

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
STATE_SCHEMA_VERSION = 1
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
_TMP_PREFIX = ".tmp-checkpoint-"

# Fused attention projections of families without separate q/v (Falcon/Bloom, Phi-3, GPT-2, Baichuan, MPT)
FUSED_QKV = ("query_key_value", "qkv_proj", "c_attn", "W_pack", "Wqkv")


class TrainableModel(Protocol):
    """What the trainer needs: a HF causal LM (``model(input_ids=, labels=).loss``) whose adapter
    parameters have ``requires_grad`` and that saves/loads its adapter (PEFT format)."""

    def parameters(self) -> Iterable[torch.nn.Parameter]: ...
    def train(self, mode: bool = True) -> Any: ...
    def __call__(self, *, input_ids: torch.Tensor, labels: torch.Tensor) -> Any: ...
    def save_adapter(self, path: str) -> None: ...
    def load_adapter(self, path: str) -> None: ...


# ---------------------------------------------------------------- LoRA targets


def default_target_modules(linear_names: Iterable[str]) -> tuple[str, ...]:
    """The attention projections LoRA adapts by default, from the dotted names of a block's Linear
    modules: ``q_proj`` and ``v_proj`` where they exist, else the fused qkv projection, else every
    Linear under an attention module."""
    names = list(linear_names)
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    if {"q_proj", "v_proj"} <= leaves:
        return ("q_proj", "v_proj")
    for fused in FUSED_QKV:
        if fused in leaves:
            return (fused,)
    attention = sorted({n.rsplit(".", 1)[-1] for n in names if re.search(r"attn|attention", n, re.IGNORECASE)})
    if attention:
        return tuple(attention)
    raise ModelError(f"cannot tell the attention projections among the block's Linear modules {sorted(leaves)}; "
                     "name the ones to adapt with --lora-target-modules")


def block_linear_names(model_config: Any) -> list[str]:
    """Dotted names of the Linear modules of one of the model's blocks (built on the meta device)."""
    from swarm.models import decoder_layer_class

    with torch.device("meta"):
        block = decoder_layer_class(model_config)(model_config, layer_idx=0)
    return [name for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]


def resolve_target_modules(linear_names: list[str], requested: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``requested`` checked against the block's Linear modules, or :func:`default_target_modules`."""
    if not requested:
        return default_target_modules(linear_names)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    unknown = [t for t in requested if t not in leaves and not any(n.endswith("." + t) or n == t for n in linear_names)]
    if unknown:
        raise ConfigError(f"--lora-target-modules {' '.join(unknown)}: the model's blocks have no such Linear "
                          f"module; they have {', '.join(leaves)}")
    return tuple(requested)


# ---------------------------------------------------------------- data order


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which examples each optimizer step trains on: step ``s`` is the same on every run."""

    num_examples: int
    per_step: int  # --gradient-accumulation
    seed: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.per_step)

    @classmethod
    def plan(cls, num_examples: int, per_step: int, seed: int, epochs: int, max_steps: int | None) -> "Schedule":
        steps_per_epoch = math.ceil(num_examples / per_step)
        return cls(num_examples, per_step, seed, max_steps if max_steps is not None else epochs * steps_per_epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_examples))
        random.Random(f"swarm-finetune:{self.seed}:{epoch}").shuffle(order)  # str seeds hash the same everywhere
        return order

    def step(self, step: int) -> tuple[int, int, list[int]]:
        """(epoch, examples of the epoch consumed after this step, the step's example indices)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        end = min((k + 1) * self.per_step, self.num_examples)
        return epoch, end, self.epoch_order(epoch)[k * self.per_step:end]


# ---------------------------------------------------------------- checkpoints


@dataclasses.dataclass
class TrainerState:
    """``trainer_state.json``: how far the run got. ``run`` must match for a checkpoint to resume."""

    step: int  # optimizer steps done
    epoch: int  # epoch of the last step done
    position: int  # examples of that epoch's order consumed
    total_steps: int
    run: dict[str, Any]  # data digest, seed, lengths, LoRA settings (see run_key)
    log_history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # {"step", "epoch", "loss"}
    schema_version: int = STATE_SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "TrainerState":
        data = json.loads(text)
        if data.get("schema_version") != STATE_SCHEMA_VERSION:
            raise ConfigError(f"{where} has trainer state schema {data.get('schema_version')}; this Swarm reads "
                              f"{STATE_SCHEMA_VERSION}: use a new --output")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"step", "epoch", "position", "total_steps", "run"} - set(data)
        if missing:
            raise ConfigError(f"{where} lacks {sorted(missing)}; use a new --output")
        return cls(**{k: v for k, v in data.items() if k in names})


def run_key(config: FinetuneConfig, data_digest: str, num_examples: int, targets: tuple[str, ...]) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: anything that changes the data order or the adapter's shape."""
    return {"data_sha256": data_digest, "num_examples": num_examples, "max_length": config.max_length,
            "seed": config.seed, "gradient_accumulation": config.gradient_accumulation, "lora_r": config.lora_r,
            "lora_alpha": config.lora_alpha, "lora_target_modules": list(targets)}


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoints(output: str) -> list[tuple[int, str]]:
    """(step, path) of the whole checkpoints in ``output``, oldest first."""
    if not os.path.isdir(output):
        return []
    found = []
    for name in os.listdir(output):
        match = _CHECKPOINT_RE.fullmatch(name)
        path = os.path.join(output, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match[1]), path))
    return sorted(found)


def save_checkpoint(output: str, state: TrainerState, model: TrainableModel, optimizer: torch.optim.Optimizer,
                    keep: int) -> str:
    """Writes ``output/checkpoint-STEP`` atomically (temporary dir, then rename); keeps the latest ``keep``."""
    final = os.path.join(output, f"checkpoint-{state.step}")
    tmp = os.path.join(output, f"{_TMP_PREFIX}{state.step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_adapter(tmp)
    torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
    torch.save(_rng_state(), os.path.join(tmp, RNG_FILE))
    _write_text(os.path.join(tmp, STATE_FILE), state.to_json())
    if os.path.exists(final):  # only when a finished run is run again
        shutil.rmtree(final)
    os.rename(tmp, final)
    for _, old in checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, model: TrainableModel, optimizer: torch.optim.Optimizer,
                    run: dict[str, Any]) -> TrainerState:
    """Restores the adapter, optimizer and RNG states from ``path``; refuses a checkpoint of another run."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = TrainerState.from_json(f.read(), path)
    changed = sorted(k for k in set(run) | set(state.run) if run.get(k) != state.run.get(k))
    if changed:
        details = "; ".join(f"{k}: {state.run.get(k)!r} then, {run.get(k)!r} now" for k in changed)
        raise ConfigError(f"{path} is a checkpoint of a different run ({details}); resume with the same data and "
                          "settings, or use a new --output")
    model.load_adapter(path)
    optimizer.load_state_dict(torch.load(os.path.join(path, OPTIMIZER_FILE), weights_only=True))
    _set_rng_state(torch.load(os.path.join(path, RNG_FILE), weights_only=False))
    return state


def save_final(output: str, state: TrainerState, model: TrainableModel) -> None:
    """The finished adapter and trainer state in ``output`` itself; each file is replaced atomically."""
    tmp = os.path.join(output, f"{_TMP_PREFIX}final-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_adapter(tmp)
    _write_text(os.path.join(tmp, STATE_FILE), state.to_json())
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output, name))
    os.rmdir(tmp)


def remove_partial_checkpoints(output: str) -> None:
    """Temporary directories of runs killed while writing a checkpoint."""
    if os.path.isdir(output):
        for name in os.listdir(output):
            if name.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(output, name), ignore_errors=True)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- the loop


def train(model: TrainableModel, examples: list[Example], config: FinetuneConfig, run: dict[str, Any],
          progress: bool = True) -> TrainerState:
    """Trains ``model``'s adapter on ``examples``, resuming from the latest checkpoint in
    ``config.output``; checkpoints every ``config.save_every`` steps and after the last one."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ModelError("the model has no trainable parameters; build it with from_pretrained(..., lora=...)")
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    schedule = Schedule.plan(len(examples), config.gradient_accumulation, config.seed, config.epochs,
                             config.max_steps)
    os.makedirs(config.output, exist_ok=True)
    remove_partial_checkpoints(config.output)
    state = TrainerState(step=0, epoch=0, position=0, total_steps=schedule.total_steps, run=run)
    found = checkpoints(config.output)
    if found:
        state = load_checkpoint(found[-1][1], model, optimizer, run)
        for group in optimizer.param_groups:  # a new --lr / --weight-decay applies from here on
            group["lr"], group["weight_decay"] = config.lr, config.weight_decay
        logger.info(f"Resuming from {found[-1][1]}: step {state.step} of {schedule.total_steps} (epoch {state.epoch}, "
                    f"{state.position} of {len(examples)} examples into it)")
        state.total_steps = schedule.total_steps
    if state.step >= schedule.total_steps:
        logger.info(f"Nothing to do: the run already reached step {state.step} of {schedule.total_steps}")
        return state

    model.train()
    bar = tqdm(total=schedule.total_steps, initial=state.step, unit="step", desc="finetune", disable=not progress,
               dynamic_ncols=True)
    with logging_redirect_tqdm() if progress else contextlib.nullcontext():  # log lines above the bar, not through it
        return _train_steps(model, examples, config, schedule, state, optimizer, trainable, bar)


def _train_steps(model: TrainableModel, examples: list[Example], config: FinetuneConfig, schedule: Schedule,
                 state: TrainerState, optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                 bar: Any) -> TrainerState:
    saved = state.step
    try:
        for step in range(state.step, schedule.total_steps):
            epoch, position, indices = schedule.step(step)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for index in indices:
                example = examples[index]
                input_ids = torch.tensor([example.input_ids])  # [1, seq]
                labels = torch.tensor([example.labels])  # [1, seq]
                loss = model(input_ids=input_ids, labels=labels).loss
                (loss / len(indices)).backward()
                total += loss.item()
            loss_value = total / len(indices)
            if not math.isfinite(loss_value):
                raise ModelError(f"the loss is {loss_value} at step {step + 1}; lower --lr (now {config.lr}) or "
                                 f"resume from an earlier checkpoint in {config.output}")
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            state.step, state.epoch, state.position = step + 1, epoch, position
            state.log_history.append({"step": step + 1, "epoch": epoch, "loss": round(loss_value, 6)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch)
            if state.step % config.save_every == 0 or state.step == schedule.total_steps:
                _checkpoint(config, state, model, optimizer, saved)
                saved = state.step
    except KeyboardInterrupt:
        if state.step > saved:
            _checkpoint(config, state, model, optimizer, saved)
        logger.info(f"Interrupted at step {state.step}; run the same command again to resume")
        raise
    finally:
        bar.close()
    return state


def _checkpoint(config: FinetuneConfig, state: TrainerState, model: TrainableModel, optimizer: torch.optim.Optimizer,
                saved: int) -> None:
    path = save_checkpoint(config.output, state, model, optimizer, config.keep_checkpoints)
    recent = [entry["loss"] for entry in state.log_history if entry["step"] > saved]
    mean = sum(recent) / max(1, len(recent))
    logger.info(f"Saved {path} (step {state.step} of {state.total_steps}, epoch {state.epoch}, "
                f"mean loss {mean:.4f} since step {saved})")


# ---------------------------------------------------------------- the command


def _load_tokenizer(auto_tokenizer: Any, model: str) -> Any:
    try:
        return auto_tokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"--model {model!r} has no tokenizer transformers can load ({first}); swarm finetune needs "
                         "one to render the data: copy the base model's tokenizer files (tokenizer.json, "
                         "tokenizer_config.json) into it, or pass its hub id") from None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM (systemd, `timeout`, Slurm, `kill`) stops training like Ctrl-C does: train() saves a
    checkpoint. Yields a list that holds the signal once one arrived (the command then exits 0)."""
    received: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: the caller handles signals
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_finetune(config: FinetuneConfig) -> int:
    """``swarm finetune``: data -> examples, the model with a fresh LoRA adapter, :func:`train`, final adapter."""
    try:
        import peft
    except ImportError as e:
        raise ConfigError("swarm finetune needs peft for its LoRA config: pip install 'peft>=0.13'") from e
    from transformers import AutoTokenizer

    from swarm.models import load_config

    from client.loop import run_sync
    from client.model import AutoDistributedModelForCausalLM

    tokenizer = _load_tokenizer(AutoTokenizer, config.model)
    source = set_chat_template(tokenizer, config.chat_template)
    if source == "fallback":
        logger.info("The tokenizer has no chat template: using the plain '### User:' / '### Assistant:' one "
                    "(docs/finetune.md); it is saved with the adapter")
    records = load_records(config.data)
    examples, stats = build_dataset(records, tokenizer, config.max_length)
    logger.info(f"Data {config.data}: {len(examples)} examples ({stats.describe()})")
    if not examples:
        raise ConfigError(f"--data {config.data}: no example has assistant tokens within --max-length "
                          f"{config.max_length}")
    targets = resolve_target_modules(block_linear_names(load_config(config.model)), config.lora_target_modules)
    run = run_key(config, file_digest(config.data), len(examples), targets)
    schedule = Schedule.plan(len(examples), config.gradient_accumulation, config.seed, config.epochs,
                             config.max_steps)
    logger.info(f"LoRA r={config.lora_r} alpha={config.lora_alpha} dropout={config.lora_dropout} on "
                f"{', '.join(targets)}; {schedule.total_steps} steps of {config.gradient_accumulation} example(s), "
                f"a checkpoint every {config.save_every} steps in {config.output}")

    torch.manual_seed(config.seed)  # the adapter's initial weights and dropout: the same run gives the same adapter
    random.seed(config.seed)
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(targets))
    model = AutoDistributedModelForCausalLM.from_pretrained(config.model, initial_peers=config.initial_peers,
                                                            dht_prefix=config.dht_prefix, dtype=config.dtype,
                                                            lora=lora, swarm_key=config.swarm_key)
    try:
        run_sync(model.remote.peer())  # join before --output is created: a wrong address leaves nothing behind
        with _sigterm_as_interrupt() as terminated:
            try:
                state = train(model, examples, config, run)
            except KeyboardInterrupt:  # train() saved a checkpoint and said how to resume
                if terminated:
                    return 0
                raise
        save_final(config.output, state, model)
        tokenizer.save_pretrained(config.output)  # with the chat template the adapter was trained on
    finally:
        model.shutdown()
    last = state.log_history[-1]["loss"] if state.log_history else float("nan")
    print(f"Done: {state.step} steps, last loss {last:.4f}. Adapter (PEFT format) in {config.output}", flush=True)
    return 0
