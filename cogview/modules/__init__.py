"""Plain nn.Modules: the CogView transformer, the VQ-VAE and the PB-relax softmax."""
