"""pf2lora: personalized federated fine-tuning with two-level low-rank adapters.

PF2LoRA (arXiv 2503.03920) and its baselines on pretrained models, run in-process or on Flower.
"""

__version__ = "0.1.0"
