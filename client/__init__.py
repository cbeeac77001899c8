"""The client: a transformers model whose blocks run in the swarm. Imports ``swarm/`` only.

- ``model``              ``AutoDistributedModelForCausalLM``: the model's own HF class around the remote blocks
- ``remote_sequence``    finding servers, chains; forward and backward passes through them (retried by swarm.retry)
- ``inference_session``  server-side KV caches kept across steps, push, failover with history replay
- ``autograd``           gradients through the remote blocks (to inputs, soft prompts and LoRA weights)
- ``tuning``             what a client trains: LoRA for remote blocks, soft prompts; PEFT save/load
- ``finetune_data``      instruction data (alpaca, sharegpt, messages) -> chat-template tokens and labels
- ``finetune``           ``swarm finetune``: the training loop with resumable checkpoints
- ``loop``               the background event loop the sync API runs on
"""
