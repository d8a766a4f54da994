"""Result files: QuPath-ready GeoJSON, pictures and reports. Never talks to servers."""
