"""Fine-tuning a finished model: ``python -m trainers.finetune``.

Methods (``trainers/finetune/methods.py``): ``ct`` (continued training), ``sft`` (supervised
fine-tuning on a curated subset) and ``dreambooth`` (a new subject from a few instance images,
with prior preservation); full fine-tuning or LoRA through peft (``trainers/finetune/lora.py``).
The trainer (``trainers/finetune/train.py``) is the post-training seam of ``trainers/post.py``.
"""
