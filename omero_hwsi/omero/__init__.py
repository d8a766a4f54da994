"""The OMERO edge: connections, image resolution and pulls, ROIs, attachments, write-back.

Nothing below the pipeline imports this package. omero-py (the ``omero`` extra) is imported
lazily, inside the functions that talk to a server or build ``omero.model`` objects, so the
pure parts (shape conversions, provenance pairs, image resolution logic) import without it.
"""
