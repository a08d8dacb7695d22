"""Preference tuning: ReFL, Flow-GRPO and Diffusion-DPO on a finished model."""
