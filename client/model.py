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
import re
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from swarm.config import ClientConfig, default_prefix
from swarm.errors import BadRequest, ModelError
from swarm.models import causal_lm_class, config_without_layers, family_of, load_config
from swarm.translate import to_native
from swarm.weights import Checkpoint

from client.inference_session import InferenceSession
from client.loop import run_sync
from client.remote_sequence import RemoteSequence

_active_session: contextvars.ContextVar[InferenceSession | None] = contextvars.ContextVar(
    "swarm_active_session", default=None)

_CLIENT_FIELDS = {f.name for f in dataclasses.fields(ClientConfig)}
_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")  # what base models call the cache they pass layers


class _SessionLayer(DynamicLayer):
    """A cache layer that holds nothing locally and reports the session's length."""

    is_compileable = False

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session

    def get_seq_length(self) -> int:
        return self.session.position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.session.position + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.session.pending_hypo_ids = beam_idx.to(torch.int64).cpu()

    def crop(self, max_length: int) -> None:
        raise BadRequest("cropping a remote cache is not supported; start a new inference session")


class RemoteCache(Cache):
    """The ``cache`` object HF sees during ``generate``: the remote session's position, nothing more."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[_SessionLayer(session)])
        self.session = session


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
        # [batch, seq, hidden] in, the same out
        if isinstance(cache, RemoteCache):
            out = cache.session.step(hidden_states)
        else:
            out = run_sync(self.sequence.forward(hidden_states.detach()))
        return (out, None) if self.returns_tuple else out


class DistributedModelMixin:
    """Added to the model's own ``*ForCausalLM`` class: sessions and session-aware ``generate``."""

    remote: RemoteSequence
    _cache_kwarg: str

    def shutdown(self) -> None:
        """Stops this client's DHT peer (its ``p2pd``); the model cannot reach the swarm afterwards."""
        run_sync(self.remote.shutdown(), timeout=30)

    def remote_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Runs [batch, seq, hidden] states through every remote block (no grad, no session)."""
        return run_sync(self.remote.forward(hidden.detach()))

    def inference_session(self, max_length: int) -> "_SessionContext":
        """A session holding up to ``max_length`` tokens (prompt + generated) in the servers' caches."""
        return _SessionContext(InferenceSession(self.remote, max_length))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # the model's own signature: families order their arguments differently (Falcon, Bloom: cache second)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None and args:
            names = list(inspect.signature(super().forward).parameters)
            if "attention_mask" in names[:len(args)]:
                attention_mask = args[names.index("attention_mask")]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise BadRequest("padded batches (attention_mask with zeros) are not supported yet; "
                             "send prompts of equal length or one at a time")
        return super().forward(*args, **kwargs)

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
            session = InferenceSession(self.remote, self._max_length(inputs, kwargs))
        if "attention_mask" not in kwargs:
            kwargs["attention_mask"] = torch.ones_like(inputs)
        try:
            kwargs[self._cache_kwarg] = RemoteCache(session)
            out = super().generate(inputs, *args, **kwargs)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            session.token_ids = sequences.detach().cpu()
            return out
        finally:
            if own:
                session.close()

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
                        trust_remote_code: bool = False, **client_kwargs: Any):
        """Builds the model's own HF class with its blocks served by the swarm.

        ``dtype`` (or ``torch_dtype``) is the dtype of the local embeddings/head and of the hidden
        states sent to servers (default float32). ``trust_remote_code=True`` allows a model that
        ships its own modeling code to run it here (refused otherwise). Other keywords set
        :class:`~swarm.config.ClientConfig`.
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
                                   trust_remote_code=trust_remote_code)
        family = family_of(model_config)
        lm_class = _distributed_class(causal_lm_class(model_config))
        local_config = config_without_layers(model_config)
        with _default_dtype(dtype):
            model = lm_class(local_config)
        model.config.num_hidden_layers = model_config.num_hidden_layers

        checkpoint = Checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
        block_re = re.compile(re.escape(family.block_prefix).replace(r"\{\}", r"\d+"))
        names = [n for n in checkpoint.weight_map if not block_re.match(n)]
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

        prefix = config.dht_prefix or default_prefix(name_or_path)
        model.remote = RemoteSequence(config, prefix, model_config.num_hidden_layers, name_or_path)
        params = inspect.signature(causal_lm_class(model_config).forward).parameters
        model._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        base = getattr(model, family.base_model_attr)
        setattr(base, family.layers_attr,
                torch.nn.ModuleList([RemoteLayers(model.remote, returns_tuple=family.layer_returns_tuple)]))
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

