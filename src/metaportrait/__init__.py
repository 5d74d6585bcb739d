"""metaportrait: identity-preserving talking-head generation (MetaPortrait, CVPR 2023) on a CPU."""

__version__ = "0.1.0"
