"""The cache service: AsyncOPD's experience hub, the only stateful service (state lives in Redis).

- `store`     ExperienceStore: admission, teacher queue (Redis Streams), byte-budget score cache
              with eviction, versioned batch claims, accounting; over atomic Lua (`scripts`).
- `prompts`   PromptCatalog: dataset cursor positions -> tokenized prompts, epochs reshuffled by seed.
- `servicer`  the thin gRPC adapter: validates every request in full, stores compact protobuf bytes.
- `main`      `start_cache(config, ...)` (in-process handle) and `serve(config, name)` (blocking).
- `bench`     `asyncopd bench cache`: service throughput vs raw Redis on the same bytes.

Admission (AReaL-style, per learner version v): open admission slots (admitted, neither trained
nor dropped) + samples already pulled at v <= (max_staleness + 1) * learner.batch_size. With
max_staleness = 0 this is strict synchronous training: one batch admitted per version, the next
only after that batch was consumed and v + 1 published.
"""
