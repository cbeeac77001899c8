"""The client: a transformers model whose blocks run in the swarm. Imports ``swarm/`` only.

- ``model``              ``AutoDistributedModelForCausalLM``: the model's own HF class around the remote blocks
- ``routing``            which servers: the DHT peer, lookups, chains, pings, bans (dead ones pinged back), reports
- ``remote_sequence``    forward and backward passes through chains of servers (retried by swarm.retry, hedged)
- ``inference_session``  server-side KV caches kept across steps, push, hedging, verification
- ``failover``           routing a session around failed or wrong servers, rebuilding their caches by replay
- ``step_frames``        concurrent steps of many sessions to one server sent (and answered) as one frame
- ``hedging``            slow or hung servers: how long a request may take, racing it on another server
- ``verifier``           re-running a sample of servers' work on other servers; acting on who is wrong
- ``checker``            ``swarm verify``: a volunteer checker of every server of a model
- ``speculative``        speculative decoding: a local draft model, the swarm verifies; draft length from costs
- ``autograd``           gradients through the remote blocks (to inputs, soft prompts and LoRA weights)
- ``tuning``             what a client trains: LoRA for remote blocks, soft prompts; PEFT save/load
- ``finetune_data``      instruction data (alpaca, sharegpt, messages) -> chat-template tokens and labels
- ``finetune``           ``swarm finetune``: the training loop with resumable checkpoints
- ``loop``               the background event loop the sync API runs on
"""
