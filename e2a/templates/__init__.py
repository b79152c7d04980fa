"""Templates: recipes (data files in recipes/) and the image builder."""
