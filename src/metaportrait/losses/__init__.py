"""Training losses: small functions and thin modules around frozen networks (perceptual, identity)."""
