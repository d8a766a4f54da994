"""Training: stages, strict weight hand-over, WSI-Bench datasets, and the loop behind ``hwsi train``.

Needs the ``worker`` extra (torch). Entry points: ``training.config.load_train_config`` and
``training.loop.train`` (imported from their modules, so importing this package stays cheap).
"""
