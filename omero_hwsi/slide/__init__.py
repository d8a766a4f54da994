"""Slide access and the slide hierarchy: readers, tissue, region/patch grid, nuclei.

Modules: ``reader`` (the ``SlideReader`` contract), ``local`` (``open_slide``), ``tissue``,
``grid``, ``hierarchy`` (``Hierarchy`` and ids) and ``nuclei``. Nothing here imports torch.
"""
