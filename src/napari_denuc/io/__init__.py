"""Reading images with their resolution, and point files in QuPath GeoJSON and CSV."""
