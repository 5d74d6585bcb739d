"""File formats: images, videos (with audio passthrough), checkpoints. The only package that knows containers."""
