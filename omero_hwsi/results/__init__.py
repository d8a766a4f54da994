"""Result files: QuPath-ready GeoJSON, pictures and (later) reports. Never talks to servers."""
