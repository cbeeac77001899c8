"""One server process (``swarm serve``). Imports ``swarm/`` only, never ``client/`` or ``health/``.

- ``server``      the lifecycle: place, announce JOINING, load, measure, serve ONLINE, move, leave OFFLINE
- ``rebalancer``  placement at startup and the periodic check whether to move (I/O around ``swarm.placement``)
- ``throughput``  measuring compute speed on the loaded blocks, and its cache
- ``loading``     how many blocks fit the device (chosen by ``swarm.devices``), loading (and re-spanning) blocks
- ``handler``     the RPC handlers: info, inference sessions, push, step frames
- ``passes``      forward and backward passes (a mixin of the handler)
- ``step_frames`` the steps stream: one client's concurrent steps of many sessions in one frame
- ``checks``      the checks every request gets before it touches the model
- ``quotas``      what one peer may hold: streams, sessions, KV cache pages, forward/backward passes (pure)
- ``streams``     deadlines on a handler's reads and writes, cancelling work whose client went away
- ``chunked_forward``  long forward passes block by block in chunks, so inference steps never wait long
- ``room``        room in a full KV cache: sessions idle for a while give their pages to busy ones
- ``adapters``    LoRA adapters preloaded with --adapters, selected per request by name
- ``push``        sending a step's output straight to the next server of a chain
- ``announcing``  when to announce next: every update period, sooner (1 s doubling) after a store that failed
- ``pings``       round trips to the servers that may come next in a chain, published in the record
- ``compute``     the compute executor: one thread per device, inference batches before queued jobs
- ``batching``    continuous batching: concurrent sessions' steps over the same blocks in one forward
- ``scheduler``   which waiting steps run together next, and chunks of long prefills (pure)
- ``kv_cache``    the paged KV cache: pages from one pool, charged to --cache-tokens as sessions fill them
- ``faults``      test-only fault injection (``SWARM_TEST_FAULTS``)
- ``walltime``    in a Slurm job: leaving the swarm before its time limit without losing a generation
"""
