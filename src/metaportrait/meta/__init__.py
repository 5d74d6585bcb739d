"""Meta-learning (Reptile): the inner loop and outer update over any `torch.nn.Module` (`reptile`)."""
