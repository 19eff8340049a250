"""DeNuC nuclei detection and classification."""
