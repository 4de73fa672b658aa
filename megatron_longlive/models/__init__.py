"""Model definitions and the layer-provider seam."""
