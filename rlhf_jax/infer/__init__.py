"""Text from params: sampling, answers to prompts, rollouts, log-probs, RM scores."""
