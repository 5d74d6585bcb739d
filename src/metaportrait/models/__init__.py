"""Networks: `nn.Module`s only, built from `metaportrait.config` dataclasses; forward passes are pure tensor code."""
