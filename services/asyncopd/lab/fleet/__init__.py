"""`asyncopd bench fleet`: simulated rollout/teacher engines and a learner stand-in against the real cache."""
