"""Policy algorithms for stage=rl: PPO, GRPO, RLOO, REINFORCE (on-policy, framework.interfaces.PolicyAlgorithm)."""
