"""Training: what each stage trains, strict weight hand-over between stages, WSI-Bench datasets.

Needs the ``worker`` extra (torch). The training loop and ``hwsi train`` build on these.
"""
