"""``AutoDistributedModelForCausalLM``: a transformers model whose decoder layers live in the swarm.

The client builds the model's own ``*ForCausalLM`` class with no decoder layers, loads only the
embeddings, final norm and LM head, and puts one :class:`RemoteLayers` module where the layers
were. Embedding scaling, final norm, soft-capping and tied heads therefore come from transformers
itself, and ``generate`` is HF's own ``generate``; a :class:`RemoteCache` keeps it in step with
the servers' KV caches.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.candidate_generator import AssistedCandidateGenerator

from swarm.config import ClientConfig, default_prefix
from swarm.errors import BadRequest, ModelError
from swarm.lora import LoraSpec
from swarm.models import DIGEST_ATTR, causal_lm_class, config_without_layers, family_of, load_config
from swarm.translate import to_native
from swarm.weights import open_checkpoint, outside_blocks

from client.autograd import RemoteBlocks
from client.inference_session import InferenceSession
from client.loop import run_sync
from client.remote_sequence import RemoteSequence
from client.speculative import SwarmDraft
from client.tuning import RemoteLora, Tuning, adapter_spec

_active_session: contextvars.ContextVar[InferenceSession | None] = contextvars.ContextVar(
    "swarm_active_session", default=None)
# the 2-D attention mask ([batch, keys]) of the forward pass running now, when it has padding
_padding_mask: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("swarm_padding", default=None)

_CLIENT_FIELDS = {f.name for f in dataclasses.fields(ClientConfig)}
_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")  # what base models call the cache they pass layers


class _SessionLayer(DynamicLayer):
    """A cache layer that holds nothing locally and reports the session's length."""

    is_compileable = False
    is_croppable = True  # speculative decoding rolls the servers' caches back (client/speculative.py)

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session

    def get_seq_length(self) -> int:  # what HF counts: the tokens it sent (not the soft prompt's)
        return self.session.position - self.session.prompt_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.session.pending_hypo_ids = beam_idx.to(torch.int64).cpu()

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` tokens (transformers' convention): the session's next step
        starts there, and the servers roll their caches back to it."""
        if tokens_to_remove > 0:
            raise BadRequest(f"crop takes a negative count of tokens to drop, got {tokens_to_remove}")
        self.session.rollback(-tokens_to_remove)


class RemoteCache(Cache):
    """The ``cache`` object HF sees during ``generate``: the remote session's position, nothing more."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[_SessionLayer(session)])
        self.session = session
        self.drafts: list[SwarmDraft] = []  # speculative decoding's candidate generators of this generate call


class RemoteLayers(torch.nn.Module):
    """Stands where the decoder layers were: sends hidden states through every remote block.

    The base model calls it like one of its layers (masks, rotary, alibi and all); those inputs are
    ignored, since servers rebuild them for their own spans. It answers the way the family's layers
    do: a tensor, or a tuple whose first item is the tensor (Falcon, Bloom).
    """

    attention_type = "full_attention"  # some families index masks by their layers' attention type

    def __init__(self, sequence: RemoteSequence, returns_tuple: bool = False):
        super().__init__()
        self.sequence = sequence
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, None]:
        cache = next((kwargs[name] for name in _CACHE_KWARGS if kwargs.get(name) is not None), None)
        tuning: Tuning | None = self.sequence.tuning
        tensors = tuning.grad_tensors() if tuning is not None else []
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or any(t.requires_grad for t in tensors))
        session = cache.session if isinstance(cache, RemoteCache) else None
        past = session.position - session.prompt_tokens if session is not None else 0
        mask, positions = _padding(hidden_states, past, _padding_mask.get(), kwargs.get("position_ids"))
        # [batch, seq, hidden] in, the same out
        if session is not None:
            if needs_grad:
                raise BadRequest("inference sessions run without gradients: train with model(input_ids, labels=...) "
                                 "outside a session, or wrap generation in torch.no_grad()")
            out = session.step(hidden_states, attention_mask=mask, position_ids=positions)
        else:
            extras = dataclasses.replace(self.sequence.extras(training=self.training), attention_mask=mask,
                                         position_ids=positions)
            if needs_grad:
                out = RemoteBlocks.apply(self.sequence, extras, hidden_states, *tensors)
            else:
                out = run_sync(self.sequence.forward(hidden_states.detach(), extras))
        return (out, None) if self.returns_tuple else out


def _padding(hidden: torch.Tensor, past: int, mask: torch.Tensor | None,
             positions: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What a step of ``hidden`` ([batch, seq, hidden] after ``past`` tokens) tells the servers of a padded
    batch: the mask of its own tokens and its rows' positions ([batch, seq] each), or None where the
    servers' defaults (no padding, positions ``past..past+seq-1``) hold."""
    batch, seq = hidden.shape[:2]
    own = None if mask is None else mask[:, -seq:].to(torch.int64).cpu()
    if positions is not None:
        positions = positions.to(torch.int64).cpu().expand(batch, seq)
        if torch.equal(positions[0], torch.arange(past, past + seq)) and bool((positions == positions[0]).all()):
            positions = None
    return (None if own is None or bool(own.all()) else own.contiguous()), (
        None if positions is None else positions.contiguous())


class _Unused(torch.nn.Module):
    """Stands where the base model's rotary embedding was: only the (remote) layers used its output."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        return None


# A 4-D mask counts as already built: the base model's mask functions return it as it is instead of
# building one per step (~0.08 ms a token); the remote layers ignore masks (servers build their own)
_PREBUILT_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


class DistributedModelMixin:
    """Added to the model's own ``*ForCausalLM`` class: sessions and session-aware ``generate``."""

    remote: RemoteSequence
    _cache_kwarg: str
    _skip_masks: bool  # the family's base model uses the mask only to pass it to its layers

    def shutdown(self) -> None:
        """Stops this client's DHT peer (its ``p2pd``); the model cannot reach the swarm afterwards."""
        run_sync(self.remote.shutdown(), timeout=30)

    def remote_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Runs [batch, seq, hidden] states through every remote block (no grad, no session)."""
        return run_sync(self.remote.forward(hidden.detach()))

    def inference_session(self, max_length: int) -> "_SessionContext":
        """A session holding up to ``max_length`` tokens (prompt + generated) in the servers' caches."""
        return _SessionContext(InferenceSession(self.remote, max_length + self._prompt_tokens()))

    def _prompt_tokens(self) -> int:
        """Soft prompt tokens a session holds besides the ones it is sent (prompt tuning)."""
        return self.tuning.pre_seq_len if self.tuning is not None else 0

    @property
    def tuning(self) -> Tuning | None:
        """The client's trainable additions (LoRA, soft prompts), or None."""
        return self.remote.tuning

    def save_adapter(self, path: str) -> None:
        """Saves the LoRA adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``);
        ``peft.PeftModel.from_pretrained(local_model, path)`` loads it onto the local transformers model."""
        if self.tuning is None or self.tuning.lora is None:
            raise BadRequest("this model has no LoRA adapter to save; create one with from_pretrained(..., "
                             "lora=peft.LoraConfig(...))")
        self.tuning.lora.save(path, self.tuning.family, base_model=self.remote.model_name)

    def load_adapter(self, path: str) -> None:
        """Loads saved LoRA weights (same rank and target modules) into this model's adapter."""
        if self.tuning is None or self.tuning.lora is None:
            raise BadRequest("this model has no LoRA adapter to load weights into; use from_pretrained(..., "
                             f"adapter={path!r})")
        self.tuning.lora.load(path, self.tuning.family)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.tuning is not None and self.tuning.prompt_embeddings is not None:
            return self._forward_with_prompts(args, kwargs)
        # the model's own signature: families order their arguments differently (Falcon, Bloom: cache second)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None and args:
            names = list(inspect.signature(super().forward).parameters)
            if "attention_mask" in names[:len(args)]:
                attention_mask = args[names.index("attention_mask")]
        padded = isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and not bool(attention_mask.all())
        if self._skip_masks and "attention_mask" in kwargs:
            kwargs["attention_mask"] = _PREBUILT_MASK
        token = _padding_mask.set(attention_mask if padded else None)
        try:
            return super().forward(*args, **kwargs)
        finally:
            _padding_mask.reset(token)

    def _forward_with_prompts(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Prompt tuning: the soft prompt embeddings go before the input embeddings; the logits of their
        positions are dropped and their labels ignored, so outputs line up with the inputs."""
        signature = inspect.signature(super().forward)
        bound = signature.bind_partial(*args, **kwargs).arguments
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
        cache = bound.get(self._cache_kwarg)
        if isinstance(cache, RemoteCache):
            if cache.session.position > 0:  # a later step of a session: the prompt is already in the caches
                return super().forward(**bound)
            for name in ("cache_position", "position_ids"):  # HF's positions count its own tokens only
                bound.pop(name, None)
        input_ids, embeds = bound.pop("input_ids", None), bound.pop("inputs_embeds", None)
        if embeds is None:
            embeds = self.get_input_embeddings()(input_ids)
        batch, tokens = embeds.shape[0], self.tuning.pre_seq_len
        prompts = self.tuning.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        bound["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        mask = bound.get("attention_mask")
        if mask is not None:
            if not bool(mask.all()):
                raise BadRequest("padded batches (attention_mask with zeros) cannot be combined with soft prompts "
                                 "(prompt tuning) yet; send prompts of equal length or one at a time")
            bound["attention_mask"] = torch.cat([mask.new_ones(batch, tokens), mask], dim=1)
        if bound.get("labels") is not None:
            labels = bound["labels"]
            bound["labels"] = torch.cat([labels.new_full((batch, tokens), -100), labels], dim=1)
        if bound.get("position_ids") is not None:
            raise BadRequest("position_ids cannot be combined with soft prompts; leave them out")
        out = super().forward(**bound)
        if isinstance(cache, RemoteCache):  # from now on HF sees its own tokens only
            cache.session.prompt_tokens = tokens
        out.logits = out.logits[:, -embeds.shape[1]:]  # (with logits_to_keep the model kept fewer already)
        return out

    def generate(self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None,
                 **kwargs):
        """HF ``generate`` through the swarm. With ``session=`` (or inside ``with model.inference_session()``)
        it continues that session: ``inputs`` may be None or new tokens to append; the returned ids are
        the whole sequence the session has seen."""
        session = session or _active_session.get()
        if isinstance(session, _SessionContext):
            session = session.session
        if inputs is None and (session is None or session.token_ids is None):
            raise BadRequest("generate() needs input ids unless it continues a session that already has some")
        if session is not None and session.token_ids is not None:
            prefix = session.token_ids.to(inputs.device) if inputs is not None else session.token_ids
            inputs = prefix if inputs is None else torch.cat([prefix, inputs], dim=1)
        own = session is None
        if own:
            session = InferenceSession(self.remote, self._max_length(inputs, kwargs) + self._prompt_tokens())
        if "attention_mask" not in kwargs:
            kwargs["attention_mask"] = torch.ones_like(inputs)
        cache = kwargs[self._cache_kwarg] = RemoteCache(session)
        try:
            out = super().generate(inputs, *args, **kwargs)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            session.token_ids = sequences.detach().cpu()
            return out
        finally:
            for draft in cache.drafts:
                draft.close()
            if own:
                session.close()

    def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                                 assistant_model=None, *args, **kwargs):
        """A draft model of the same vocabulary (transformers' plain ``AssistedCandidateGenerator``) drafts
        with a draft length chosen from measured costs (:class:`client.speculative.SwarmDraft`); every
        other kind of candidate is transformers' own."""
        generator = super()._get_candidate_generator(generation_config, input_ids, inputs_tensor, logits_processor,
                                                     model_kwargs, assistant_model, *args, **kwargs)
        cache = model_kwargs.get(self._cache_kwarg)
        if type(generator) is not AssistedCandidateGenerator or not isinstance(cache, RemoteCache):
            return generator
        draft = SwarmDraft(input_ids, assistant_model, generation_config, model_kwargs, inputs_tensor, logits_processor,
                           stats=cache.session.speculation)
        cache.drafts.append(draft)
        return draft

    def _max_length(self, inputs: torch.Tensor, kwargs: dict) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if max_new is not None:
            return inputs.shape[1] + max_new
        return max(kwargs.get("max_length", getattr(config, "max_length", None) or 0), inputs.shape[1] + 1)


class _SessionContext:
    """What ``model.inference_session()`` returns: the session, active for ``generate`` inside ``with``."""

    def __init__(self, session: InferenceSession):
        self.session = session
        self._token: contextvars.Token | None = None

    def __enter__(self) -> InferenceSession:
        self._token = _active_session.set(self.session)
        return self.session

    def __exit__(self, *exc) -> None:
        if self._token is not None:
            _active_session.reset(self._token)
        self.session.close()


_CLASS_CACHE: dict[type, type] = {}


def _distributed_class(lm_class: type) -> type:
    if lm_class not in _CLASS_CACHE:
        _CLASS_CACHE[lm_class] = type(f"Distributed{lm_class.__name__}", (DistributedModelMixin, lm_class), {})
    return _CLASS_CACHE[lm_class]


class AutoDistributedModelForCausalLM:
    """Entry point: ``AutoDistributedModelForCausalLM.from_pretrained(name_or_path, initial_peers=[...])``."""

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, initial_peers: list[str] | tuple[str, ...] | None = None,
                        dtype: torch.dtype | str | None = None, torch_dtype: torch.dtype | str | None = None,
                        revision: str | None = None, cache_dir: str | None = None, token: str | bool | None = None,
                        trust_remote_code: bool = False, lora: Any = None, adapter: str | None = None,
                        active_adapter: str | None = None, tuning_mode: str | None = None, pre_seq_len: int = 0,
                        gguf_file: str | None = None, **client_kwargs: Any):
        """Builds the model's own HF class with its blocks served by the swarm.

        ``dtype`` (or ``torch_dtype``) is the dtype of the local embeddings/head and of the hidden
        states sent to servers (default float32). A GGUF file is ``name_or_path="x.gguf"``, or
        ``gguf_file=NAME`` in a directory or hub repository (as in transformers): the config, embeddings
        and head come from it, and the swarm is found under the file's name. ``trust_remote_code=True`` allows a model that
        ships its own modeling code to run it here (refused otherwise). Other keywords set
        :class:`~swarm.config.ClientConfig`.

        Fine-tuning (the base weights are frozen then; only what these add requires grad):
        ``lora=peft.LoraConfig(...)`` adds a trainable LoRA adapter for the remote blocks;
        ``adapter=PATH`` loads a saved one (frozen; ``model.tuning.requires_grad_()`` to train on);
        ``active_adapter=NAME`` uses an adapter the servers preloaded (``swarm serve --adapters``);
        ``tuning_mode="ptune"`` or ``"deep_ptune"`` with ``pre_seq_len=N`` adds N trainable soft prompt tokens
        (deep: also before every block).
        """
        unknown = set(client_kwargs) - _CLIENT_FIELDS
        if unknown:
            raise TypeError(f"unknown arguments {sorted(unknown)}; client options are {sorted(_CLIENT_FIELDS)}")
        if initial_peers is not None:
            client_kwargs["initial_peers"] = tuple(initial_peers)
        client_kwargs.setdefault("dht_prefix", None)
        config = ClientConfig(**client_kwargs)
        dtype = _parse_dtype(dtype if dtype is not None else torch_dtype)

        model_config = load_config(name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                                   trust_remote_code=trust_remote_code, gguf_file=gguf_file)
        family = family_of(model_config)
        lm_class = _distributed_class(causal_lm_class(model_config))
        local_config = config_without_layers(model_config)
        with _default_dtype(dtype):
            model = lm_class(local_config)
        model.config.num_hidden_layers = model_config.num_hidden_layers

        checkpoint = open_checkpoint(name_or_path, model_config, gguf_file=gguf_file, revision=revision,
                                     cache_dir=cache_dir, token=token)
        names = outside_blocks(checkpoint.weight_map, family.block_prefix)
        packed = [n for n in names if n.endswith((".qweight", ".qzeros"))]
        if packed:
            raise ModelError(f"{name_or_path!r} has 4-bit {packed[0]}: a client holds the embeddings and LM head in "
                             "float, so they must not be quantized")
        state = to_native(causal_lm_class(model_config), model_config, checkpoint.load(names, dtype))
        if family.translation is not None:  # a renamed checkpoint: its names/values -> the native model's
            state = family.translation.top(state, model_config)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ModelError(f"checkpoint tensors {result.unexpected_keys[:5]} do not fit {lm_class.__name__}")
        if result.missing_keys:
            model.tie_weights()
            tied = {name for name, _ in model.named_parameters()}  # named_parameters() dedups tied weights
            missing = [k for k in result.missing_keys if k in tied]
            if missing:
                raise ModelError(f"checkpoint {name_or_path!r} lacks tensors {missing[:5]}")

        prefix = config.dht_prefix or default_prefix(gguf_file or name_or_path)
        model.remote = RemoteSequence(config, prefix, model_config.num_hidden_layers, name_or_path,
                                      config_digest=getattr(model_config, DIGEST_ATTR, ""))
        if lora is not None or adapter is not None or active_adapter or tuning_mode is not None or pre_seq_len:
            model.requires_grad_(False)  # the base model is frozen; what tuning adds is trained
            remote_lora = None
            if lora is not None or adapter is not None:
                spec = LoraSpec.from_peft(lora) if lora is not None else adapter_spec(adapter)
                remote_lora = RemoteLora.for_model(model_config, family, spec, dtype)
                if adapter is not None:
                    remote_lora.load(adapter, family)
                    remote_lora.requires_grad_(lora is not None)
            embeddings = model.get_input_embeddings().weight
            model.swarm_tuning = Tuning(model_config, family, lora=remote_lora, tuning_mode=tuning_mode,
                                        pre_seq_len=pre_seq_len, active_adapter=active_adapter or "",
                                        embedding_std=float(embeddings.detach().float().std()), dtype=dtype)
            model.remote.tuning = model.swarm_tuning
        params = inspect.signature(causal_lm_class(model_config).forward).parameters
        model._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        base = getattr(model, family.base_model_attr)
        setattr(base, family.layers_attr,
                torch.nn.ModuleList([RemoteLayers(model.remote, returns_tuple=family.layer_returns_tuple)]))
        if family.rotary_attr is not None and isinstance(getattr(base, family.rotary_attr, None), torch.nn.Module):
            setattr(base, family.rotary_attr, _Unused())  # servers rebuild positions for their own spans
        model._skip_masks = family.block_inputs is None  # alibi families build their bias from the 2-D mask
        return model.eval()


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, str):
        parsed = getattr(torch, dtype, None)
        if not isinstance(parsed, torch.dtype):
            raise BadRequest(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
        dtype = parsed
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise BadRequest(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    return dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)

