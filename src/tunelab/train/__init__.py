"""Training: the SFT workflow (workflow.py) on the Hugging Face Trainer with tunelab's loss, callbacks and checkpoints."""
