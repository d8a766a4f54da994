"""QuPath side of omero-hwsi: reading QuPath GeoJSON and writing QuPath projects.

The GeoJSON that QuPath imports is written by ``omero_hwsi.results``; reading QuPath exports
and paquo projects arrive with the QuPath-bridge issue.
"""
