"""Distillation of a finished flow run into a few-step student: ``python -m trainers.distill``.

Methods (each in its own module, its loss written next to the paper's equation): ``progressive``,
``consistency``, ``reflow``, ``dmd``, ``add``. See ``trainers/distill/base.py`` for the contract.
"""
