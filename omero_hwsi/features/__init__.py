"""Patch, region and slide features: encoder registry, encoders, selection and stores.

Kept free of imports so that importing a submodule (e.g. the registry in a CPU worker)
loads only what it needs; encoders register themselves via
:mod:`omero_hwsi.features.registry`.
"""
