"""The rollout service: student generation (vLLM or transformers engines) with per-token behaviour log-probs,
versions and support (student top-k or Monte-Carlo draws); receives weights through `weightsync`."""
