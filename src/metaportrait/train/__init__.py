"""Training loops, one function per structurally different loop: `base.train_base` (warp / full stages)."""
