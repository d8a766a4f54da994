"""QuPath side of omero-hwsi: reading QuPath GeoJSON and reading and writing QuPath projects.

The GeoJSON that QuPath imports is written by ``omero_hwsi.results``; ``geojson`` reads QuPath
exports (pure Python), ``project`` reads and writes projects through paquo (needs QuPath).
"""
