"""The cache service: AsyncOPD's experience hub, the only stateful service (state lives in Redis).

- `policy`    StalenessPolicy: the staleness window, the stale bound, what is refused (pure).
- `store`     ExperienceStore: admission, teacher queue (Redis Streams), byte-budget score cache
              with eviction, versioned batch claims, accounting; over atomic Lua (`scripts`,
              source in `lua/*.lua`).
- `prompts`   PromptCatalog: dataset cursor positions -> tokenized prompts, epochs reshuffled by seed.
- `requests`  parsing: every request validated in full into store records (compact protobuf bytes).
- `recorder`  events -> Prometheus metrics (or a no-op recorder).
- `servicer`  the thin gRPC adapter: parse, call the store, reply.
- `main`      `start_cache(config, ...)` (in-process handle) and `serve(config, name)` (blocking).

Admission (AReaL-style, per learner version v): open admission slots (admitted, neither trained
nor dropped) + samples already pulled at v <= the window (max_staleness + 1) * learner.batch_size
(`policy.StalenessPolicy.window`, reported in Stats as `staleness_window`). With
max_staleness = 0 this is strict synchronous training: one batch admitted per version, the next
only after that batch was consumed and v + 1 published.
"""
