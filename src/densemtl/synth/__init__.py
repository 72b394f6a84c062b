"""The procedural street-scene renderer behind ``densemtl data synth`` and the synthetic drive video."""
